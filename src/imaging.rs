//! Image output utilities: tensor <-> image conversion, atomic PNG writing,
//! preview strips and labelled comparison grids.
//!
//! Text is rendered with the embedded DejaVu Sans font (see `assets/fonts/LICENSE-DejaVu.txt`), so the binary
//! does not depend on any font installed on the host.
//!
//! All text — the labels of grids and strips ([`draw_text`]) and every text of a plotters chart (tick labels,
//! axis titles, caption, legend; drawn through [`TextBackend`]) — is placed by one routine of ours on `ab_glyph`:
//! the pen advances by each glyph's advance plus kerning in fractional pixels, and each glyph's outline is
//! rasterised at its pixel bounds (left side bearing included), its coverage alpha-blended onto the image.
//! [`text_width`] and [`line_height`] measure with the same metrics, so measured and drawn text agree.
//!
//! Plotters (0.3.7, `ab_glyph` font backend) is not used to draw text: it drops each glyph's left side bearing
//! and rounds the pen down to a whole pixel for every glyph, so letter gaps come out wrong by up to ~2 px at
//! 14 px ("He llo"), with no setting to change it; its vertical placement is `px / 2` above the baseline and its
//! size estimate a fixed `px / 1.24` high (less than one line of ink). Plotters still lays out and draws the
//! charts (axes, ticks, grid lines, series, legend box): [`TextBackend`] wraps its bitmap backend and takes over
//! only `draw_text` and `estimate_text_size`. Plotters' legend alone still measures its names with plotters' own
//! font engine (to size its box), which is why the embedded font is also registered with plotters.

use std::path::Path;
use std::sync::{Once, OnceLock};

use ab_glyph::{point, Font, FontRef, GlyphId, PxScale, ScaleFont};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::codecs::png::PngEncoder;
use image::{ImageReader, Rgb, RgbImage};
use plotters::prelude::{BitMapBackend, FontDesc, FontFamily, FontStyle};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind,
    FontTransform,
};

/// Bytes of the embedded label font (DejaVu Sans, Bitstream Vera licence).
pub static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

const ELLIPSIS: &str = "\u{2026}";
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
/// Upper bound for an automatically sized row-label column, in pixels (before padding).
const MAX_AUTO_ROW_LABEL_WIDTH: u32 = 200;

/// The parsed embedded font (parsed once, shared), for its vertical metrics.
fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| {
        FontRef::try_from_slice(FONT_BYTES).expect("embedded DejaVuSans.ttf is a valid font")
    })
}

// ---------------------------------------------------------------------------
// Tensor <-> image
// ---------------------------------------------------------------------------

/// Converts a `[B, 3, H, W]` tensor with values in `[0, 1]` (any float or integer
/// dtype, any device) into `B` RGB images.
///
/// Values are clamped to `[0, 1]` and quantised with `round(x * 255)`; NaN maps to 0.
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = t.dims4().with_context(|| {
        format!(
            "tensor_to_images: expected a [B,3,H,W] tensor, got shape {:?}",
            t.dims()
        )
    })?;
    ensure!(
        c == 3,
        "tensor_to_images: expected 3 channels, got shape {:?}",
        t.dims()
    );
    let (w32, h32) = (u32::try_from(w)?, u32::try_from(h)?);
    let data = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
        .context("tensor_to_images: reading tensor data")?;
    let plane = h * w;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let base = i * 3 * plane;
        let mut raw = Vec::with_capacity(3 * plane);
        for p in 0..plane {
            for ch in 0..3 {
                raw.push(quantise(data[base + ch * plane + p]));
            }
        }
        out.push(
            RgbImage::from_raw(w32, h32, raw).context("tensor_to_images: buffer size mismatch")?,
        );
    }
    Ok(out)
}

fn quantise(x: f32) -> u8 {
    if x.is_nan() {
        0
    } else {
        (x.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

/// Converts equally sized RGB images into a `[B, 3, H, W]` `f32` tensor with values
/// in `[0, 1]` on `device`. Errors on an empty slice or on differing sizes.
pub fn images_to_tensor(imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
    let first = imgs.first().context("images_to_tensor: no images given")?;
    let (w, h) = first.dimensions();
    for (i, img) in imgs.iter().enumerate() {
        ensure!(
            img.dimensions() == (w, h),
            "images_to_tensor: image {i} is {}x{}, expected {w}x{h} like image 0",
            img.width(),
            img.height()
        );
    }
    let plane = (w as usize) * (h as usize);
    let mut data = vec![0f32; imgs.len() * 3 * plane];
    for (i, img) in imgs.iter().enumerate() {
        let base = i * 3 * plane;
        for (p, px) in img.pixels().enumerate() {
            for ch in 0..3 {
                data[base + ch * plane + p] = f32::from(px.0[ch]) / 255.0;
            }
        }
    }
    Ok(Tensor::from_vec(
        data,
        (imgs.len(), 3, h as usize, w as usize),
        device,
    )?)
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// Loads an image in any format the `image` crate can decode (detected from the
/// content, not only the extension) and converts it to RGB8.
///
/// The declared size is checked against [`diffpref_pipelines::limits`] before anything is decoded, so a small
/// file declaring a huge image is an error, not an allocation abort.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let reader = ImageReader::open(path)
        .with_context(|| format!("opening image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading image {}", path.display()))?;
    decode_bounded(reader, &path.display().to_string())
}

/// Decodes an image from memory (`what` names it in errors) within the size limits of [`load_image`].
pub fn decode_image_bytes(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("reading image {what}"))?;
    decode_bounded(reader, what)
}

fn decode_bounded<R: std::io::BufRead + std::io::Seek>(
    mut reader: ImageReader<R>,
    what: &str,
) -> Result<RgbImage> {
    let max = diffpref_pipelines::limits::max_side();
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max.min(u32::MAX as u64) as u32);
    limits.max_image_height = Some(max.min(u32::MAX as u64) as u32);
    // Room for the decoded image in its widest format (16-bit RGBA) at the largest allowed size.
    limits.max_alloc = Some(max.saturating_mul(max).saturating_mul(8));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => anyhow::anyhow!(
            "image {what}: {l} (images are limited to {max} pixels per side; set DIFFPREF_MAX_SIDE to allow \
             larger ones)"
        ),
        e => anyhow::Error::new(e).context(format!("decoding image {what}")),
    })?;
    Ok(img.to_rgb8())
}

/// Writes `img` as a PNG to `path` atomically ([`crate::io::write_atomic_with`]: parent folders are created,
/// a reader sees the old file or the whole new one, and on error nothing is left behind).
pub fn save_png(img: &RgbImage, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    crate::io::write_atomic_with(path, |w| {
        img.write_with_encoder(PngEncoder::new(w))
            .with_context(|| format!("encoding PNG for {}", path.display()))
    })
}

// ---------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------

/// Family name under which [`FONT_BYTES`] is registered with plotters (also plotters' default family).
///
/// Plotters draws no text of ours (see the module docs), but its legend sizes its box with its own font engine
/// ([`FontDesc`] measurements, not the backend's), so the font must be known to plotters for that box to fit the
/// labels.
pub(crate) const FONT_FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters (once; later calls do nothing).
pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ok = plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES).is_ok();
        assert!(ok, "embedded DejaVuSans.ttf is a valid font");
    });
}

/// The embedded font at `px` pixels (the height from descender to ascender) as a plotters font, for the styles
/// of chart text: [`TextBackend`] takes its size, colour, anchor and rotation and draws it with [`place_glyphs`].
pub(crate) fn font_desc(px: f32) -> FontDesc<'static> {
    register_font();
    FontDesc::new(
        FontFamily::Name(FONT_FAMILY),
        f64::from(px),
        FontStyle::Normal,
    )
}

/// Height in pixels of one line of text at `px` (ascent - descent + line gap), rounded up.
pub fn line_height(px: f32) -> u32 {
    if !valid_px(px) {
        return 0;
    }
    let f = font().as_scaled(PxScale::from(px));
    (f.height() + f.line_gap()).ceil().max(0.0) as u32
}

/// How far below the top of a line at `px` the middle of its lowercase letters lies (half the height of `x` above
/// the baseline): where a mark beside the line looks centred on it.
pub(crate) fn x_height_middle(px: f32) -> f32 {
    if !valid_px(px) {
        return 0.0;
    }
    let f = font().as_scaled(PxScale::from(px));
    // The outline's bounds are in font units, y pointing up from the baseline (ab_glyph keeps the top in `min.y`).
    let x_height = font().outline(f.glyph_id('x')).map_or(0.0, |o| {
        o.bounds.min.y.max(o.bounds.max.y) * f.v_scale_factor()
    });
    f.ascent() - x_height / 2.0
}

/// Width in pixels (rounded up) of `text` rendered at `px`: the glyph advances with kerning, exactly the pen
/// movement of [`place_glyphs`]; for multi-line text the widest line.
pub fn text_width(text: &str, px: f32) -> u32 {
    if !valid_px(px) {
        return 0;
    }
    text.split('\n')
        .map(|l| line_width(l, px))
        .fold(0f32, f32::max)
        .ceil() as u32
}

fn line_width(line: &str, px: f32) -> f32 {
    let f = font().as_scaled(PxScale::from(px));
    let mut w = 0.0;
    let mut prev: Option<GlyphId> = None;
    for c in line.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            w += f.kern(p, id);
        }
        w += f.h_advance(id);
        prev = Some(id);
    }
    w
}

fn valid_px(px: f32) -> bool {
    px.is_finite() && px > 0.0
}

/// Width and height of the box of `text` at `px`: [`text_width`] × (lines × [`line_height`]).
fn text_box(text: &str, px: f32) -> (u32, u32) {
    let lines = text.split('\n').count() as u32;
    (text_width(text, px), lines.saturating_mul(line_height(px)))
}

/// The one glyph-placement routine behind all text (grid and strip labels through [`draw_text`], chart text
/// through [`TextBackend`]).
///
/// Lays out `text` at `px` with the top-left corner of its first line box at `origin` — the baseline `ascent`
/// below it, further lines [`line_height`] apart — and calls `emit(x, y, coverage)` for every pixel a glyph
/// covers (coverage in `(0, 1]`). The pen moves by each glyph's advance plus the kerning with the glyph before,
/// in fractional pixels from the start of the line; each glyph's outline is rasterised where the pen puts it,
/// its left side bearing included (its pixel bounds). The layout is computed relative to `origin`, so moving the
/// origin by whole pixels moves the pixels and changes none of them.
fn place_glyphs(text: &str, px: f32, origin: (i64, i64), mut emit: impl FnMut(i64, i64, f32)) {
    if !valid_px(px) {
        return;
    }
    let font = font();
    let f = font.as_scaled(PxScale::from(px));
    let lh = i64::from(line_height(px));
    for (li, line) in text.split('\n').enumerate() {
        let top = origin.1 + li as i64 * lh;
        let mut pen = 0f32;
        let mut prev: Option<GlyphId> = None;
        for c in line.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                pen += f.kern(p, id);
            }
            let glyph = id.with_scale_and_position(f.scale(), point(pen, f.ascent()));
            if let Some(outlined) = font.outline_glyph(glyph) {
                // Whole pixels (the outline's extent rounded outwards), relative to the line's top-left.
                let b = outlined.px_bounds();
                let (bx, by) = (origin.0 + b.min.x as i64, top + b.min.y as i64);
                outlined.draw(|gx, gy, cov| {
                    if cov > 0.0 {
                        emit(bx + i64::from(gx), by + i64::from(gy), cov.min(1.0));
                    }
                });
            }
            pen += f.h_advance(id);
            prev = Some(id);
        }
    }
}

/// Clip rectangle `[x0, x1) × [y0, y1)` in image coordinates.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Clip {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Clip {
    fn image(img: &RgbImage) -> Self {
        Self::size(img.dimensions())
    }
    fn size((w, h): (u32, u32)) -> Self {
        Clip {
            x0: 0,
            y0: 0,
            x1: i64::from(w),
            y1: i64::from(h),
        }
    }
    fn intersect(self, o: Clip) -> Clip {
        Clip {
            x0: self.x0.max(o.x0),
            y0: self.y0.max(o.y0),
            x1: self.x1.min(o.x1),
            y1: self.y1.min(o.y1),
        }
    }
    fn is_empty(&self) -> bool {
        self.x0 >= self.x1 || self.y0 >= self.y1
    }
    fn contains(&self, x: i64, y: i64) -> bool {
        (self.x0..self.x1).contains(&x) && (self.y0..self.y1).contains(&y)
    }
}

/// Draws `text` with its top-left corner at `(x, y)` (the baseline is `y + ascent`)
/// at pixel size `px` in `color`, alpha-blending the anti-aliased glyph coverage
/// onto `img`. `'\n'` starts a new line; anything outside the image is clipped.
pub fn draw_text(img: &mut RgbImage, x: i32, y: i32, text: &str, px: f32, color: Rgb<u8>) {
    let clip = Clip::image(img);
    draw_text_clipped(img, x, y, text, px, color, clip);
}

/// [`draw_text`] that leaves every pixel outside `clip` untouched.
///
/// The pixels go through [`TextBackend::put_text`] on a [`BitMapBackend`] over `img`, the path chart text takes,
/// so a label and a chart text of the same string at the same place are the same pixels.
fn draw_text_clipped(
    img: &mut RgbImage,
    x: i32,
    y: i32,
    text: &str,
    px: f32,
    color: Rgb<u8>,
    clip: Clip,
) {
    let clip = clip.intersect(Clip::image(img));
    if clip.is_empty() || !valid_px(px) {
        return;
    }
    let size = img.dimensions();
    let mut backend = TextBackend(BitMapBackend::with_buffer(img, size));
    let [r, g, b] = color.0;
    let color = BackendColor {
        alpha: 1.0,
        rgb: (r, g, b),
    };
    let origin = (i64::from(x), i64::from(y));
    // A bitmap backend never fails to draw a pixel.
    let drawn = backend.put_text(text, px, color, origin, (0, 0), &FontTransform::None, clip);
    debug_assert!(drawn.is_ok(), "drawing text: {drawn:?}");
}

/// A plotters backend that draws text with [`place_glyphs`] (the renderer of [`draw_text`]) and hands everything
/// else — lines, rectangles, polygons, circles, pixels — to the backend it wraps.
///
/// Plotters calls the backend for each text of a chart (tick labels, axis titles, caption, legend lines) with the
/// text, a style (size, colour, anchor, rotation; the font family is ignored: all text is the embedded font) and
/// a point. The text box is [`text_width`] × (lines × [`line_height`]) (also what [`DrawingBackend::estimate_text_size`]
/// answers, unrotated like plotters' default); the style's anchor puts the box's left / centre / right and top /
/// centre / bottom at the point, in the text's own frame, which the style's rotation (90°, 180° or 270°, as
/// plotters' `FontTransform::transform` maps it) then turns about the point: `Rotate270` reads bottom to top with
/// the box's top edge on the point's side. Each covered pixel is drawn with the wrapped backend's `draw_pixel` in
/// the style's colour at alpha = coverage × the colour's alpha ([`BitMapBackend`] blends it with the pixel
/// below); pixels outside the backend are skipped.
pub struct TextBackend<DB>(pub DB);

impl<DB: DrawingBackend> TextBackend<DB> {
    /// Draws `text` at `px` through [`place_glyphs`]: its box's top-left corner sits at `offset` in the text's
    /// frame, the frame's origin at `origin` on the backend, turned by `transform`; only pixels inside `clip`
    /// are drawn.
    #[allow(clippy::too_many_arguments)]
    fn put_text(
        &mut self,
        text: &str,
        px: f32,
        color: BackendColor,
        origin: (i64, i64),
        offset: (i64, i64),
        transform: &FontTransform,
        clip: Clip,
    ) -> Result<(), DrawingErrorKind<DB::ErrorType>> {
        if clip.is_empty() || color.alpha <= 0.0 {
            return Ok(());
        }
        let mut result = Ok(());
        place_glyphs(text, px, offset, |x, y, cov| {
            if result.is_err() {
                return;
            }
            // Pixel (x, y) of the text's frame is the square [x, x+1) × [y, y+1); turned about the frame's
            // origin it is the square whose top-left corner the match gives.
            let (dx, dy) = match transform {
                FontTransform::None => (x, y),
                FontTransform::Rotate90 => (-y - 1, x),
                FontTransform::Rotate180 => (-x - 1, -y - 1),
                FontTransform::Rotate270 => (y, -x - 1),
            };
            let (px_x, px_y) = (origin.0 + dx, origin.1 + dy);
            if !clip.contains(px_x, px_y) {
                return;
            }
            // Inside the clip, hence inside the backend (i32 coordinates).
            let c = BackendColor {
                alpha: color.alpha * f64::from(cov),
                rgb: color.rgb,
            };
            result = self.0.draw_pixel((px_x as i32, px_y as i32), c);
        });
        result
    }
}

impl<DB: DrawingBackend> DrawingBackend for TextBackend<DB> {
    type ErrorType = DB::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let px = style.size() as f32;
        if !valid_px(px) {
            return Ok(());
        }
        let (w, h) = text_box(text, px);
        let (w, h) = (i64::from(w), i64::from(h));
        let anchor = style.anchor();
        let ox = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Center => -(w / 2),
            HPos::Right => -w,
        };
        let oy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -(h / 2),
            VPos::Bottom => -h,
        };
        let clip = Clip::size(self.get_size());
        let origin = (i64::from(pos.0), i64::from(pos.1));
        self.put_text(
            text,
            px,
            style.color(),
            origin,
            (ox, oy),
            &style.transform(),
            clip,
        )
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        Ok(text_box(text, style.size() as f32))
    }
}

/// Truncates `s` (dropping characters from the end) so that `s + "…"` fits in
/// `max_w`; returns `"…"` alone if nothing else fits, or `""` if not even that.
fn ellipsize(s: &str, px: f32, max_w: u32) -> String {
    let mut chars: Vec<char> = s.trim_end().chars().collect();
    loop {
        let cand: String = chars.iter().collect::<String>() + ELLIPSIS;
        if text_width(&cand, px) <= max_w {
            return cand;
        }
        if chars.pop().is_none() {
            return String::new();
        }
        while chars.last().is_some_and(|c| c.is_whitespace()) {
            chars.pop();
        }
    }
}

/// Breaks `text` into at most `max_lines` lines that each fit in `max_w` pixels at
/// `px`: greedy word wrapping (explicit `'\n'` are honoured, overlong words are
/// split between characters); if the text does not fit, the last kept line ends
/// with "…".
pub fn fit_text(text: &str, px: f32, max_w: u32, max_lines: usize) -> Vec<String> {
    if max_lines == 0 || text.trim().is_empty() {
        return Vec::new();
    }
    let fits = |s: &str| text_width(s, px) <= max_w;
    let mut lines: Vec<String> = Vec::new();
    for para in text.split('\n') {
        let mut cur = String::new();
        for word in para.split_whitespace() {
            let joined = if cur.is_empty() {
                word.to_string()
            } else {
                format!("{cur} {word}")
            };
            if fits(&joined) {
                cur = joined;
                continue;
            }
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            // Place `word` on fresh lines, splitting it if it is too long.
            for c in word.chars() {
                let mut next = cur.clone();
                next.push(c);
                if fits(&next) || cur.is_empty() {
                    cur = next;
                } else {
                    lines.push(std::mem::replace(&mut cur, c.to_string()));
                }
            }
        }
        lines.push(cur);
    }
    // Drop trailing empty lines (from trailing newlines).
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        let last = lines.pop().unwrap_or_default();
        lines.push(ellipsize(&last, px, max_w));
    } else if let Some(last) = lines.last_mut() {
        // A single character wider than max_w can only happen for a tiny width.
        if !fits(last) {
            *last = ellipsize(last, px, max_w);
        }
    }
    lines
}

// ---------------------------------------------------------------------------
// Strips
// ---------------------------------------------------------------------------

/// Places `images` left to right, top-aligned, separated by `gap` white pixels.
/// Images may differ in size (the strip is as tall as the tallest); an empty
/// slice gives a 0×0 image.
pub fn strip(images: &[RgbImage], gap: u32) -> RgbImage {
    strip_with_top(images, gap, 0)
}

fn strip_with_top(images: &[RgbImage], gap: u32, top: u32) -> RgbImage {
    if images.is_empty() {
        return RgbImage::new(0, 0);
    }
    let width = images.iter().map(|i| i.width()).sum::<u32>() + gap * (images.len() as u32 - 1);
    let height = top + images.iter().map(|i| i.height()).max().unwrap_or(0);
    let mut out = RgbImage::from_pixel(width, height, WHITE);
    let mut x = 0u32;
    for img in images {
        image::imageops::replace(&mut out, img, i64::from(x), i64::from(top));
        x += img.width() + gap;
    }
    out
}

/// Like [`strip`] with a 2 px gap, plus a small label above each image (e.g. the
/// denoising step of an x0 preview). `labels[i]` belongs to `images[i]`; missing
/// labels are left blank, extra ones ignored. Labels are centred and truncated
/// with "…" to the image width; the font size follows the image height
/// (10–16 px).
pub fn labelled_strip(images: &[RgbImage], labels: &[String]) -> RgbImage {
    const GAP: u32 = 2;
    if images.is_empty() {
        return RgbImage::new(0, 0);
    }
    if labels.iter().all(|l| l.trim().is_empty()) {
        return strip(images, GAP);
    }
    let max_h = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let px = (max_h as f32 / 8.0).clamp(10.0, 16.0);
    let pad = 2;
    let top = line_height(px) + 2 * pad;
    let mut out = strip_with_top(images, GAP, top);
    let mut x = 0u32;
    for (i, img) in images.iter().enumerate() {
        if let Some(label) = labels.get(i) {
            let line = fit_text(label, px, img.width(), 1)
                .pop()
                .unwrap_or_default();
            let tw = text_width(&line, px);
            let lx = x as i64 + (i64::from(img.width()) - i64::from(tw)) / 2;
            let clip = Clip {
                x0: i64::from(x),
                y0: 0,
                x1: i64::from(x + img.width()),
                y1: i64::from(top),
            };
            draw_text_clipped(&mut out, lx as i32, pad as i32, &line, px, BLACK, clip);
        }
        x += img.width() + GAP;
    }
    out
}

// ---------------------------------------------------------------------------
// Grids
// ---------------------------------------------------------------------------

/// Layout options for [`grid`] / [`Grid`].
#[derive(Clone, Debug, PartialEq)]
pub struct GridOptions {
    /// Gap in pixels between cells (and between the label areas and the cells).
    pub cell_gap: u32,
    /// Label font size in pixels.
    pub font_px: f32,
    /// Height of the column-label band on top; `None` sizes it to the labels
    /// (up to 2 wrapped lines). Ignored (0) when there are no column labels.
    pub label_height: Option<u32>,
    /// Width of the row-label column on the left; `None` sizes it to the widest
    /// label (at most 200 px plus padding). Ignored (0) when there are no row labels.
    pub row_label_width: Option<u32>,
    /// Integer nearest-neighbour upscaling factor applied to every cell (≥ 1),
    /// e.g. 4 for 32×32 samples.
    pub scale: u32,
    /// Background colour (gaps and label areas).
    pub background: Rgb<u8>,
    /// Label text colour.
    pub text_color: Rgb<u8>,
}

impl Default for GridOptions {
    fn default() -> Self {
        GridOptions {
            cell_gap: 4,
            font_px: 14.0,
            label_height: None,
            row_label_width: None,
            scale: 1,
            background: WHITE,
            text_color: BLACK,
        }
    }
}

/// Nearest-neighbour integer upscaling.
fn upscale(img: &RgbImage, s: u32) -> RgbImage {
    if s <= 1 {
        return img.clone();
    }
    RgbImage::from_fn(img.width() * s, img.height() * s, |x, y| {
        *img.get_pixel(x / s, y / s)
    })
}

/// Renders a labelled grid: `cells[r][c]` is the image in row `r`, column `c`.
///
/// All cells must have the same size (the error names the offending row and
/// column); rows may be shorter than the longest row, leaving background.
/// `row_labels` / `col_labels` must be empty or have one entry per row / column.
/// Column labels are centred above the columns, row labels left-aligned in a
/// column on the left; both are word-wrapped to fit and truncated with "…".
/// Layout (no outer margin): width = row label width + cols·(cell·scale) +
/// (cols−1)·gap, height = column label height + rows·(cell·scale) + (rows−1)·gap,
/// where each label area is followed by one gap.
pub fn grid(
    cells: &[Vec<RgbImage>],
    row_labels: &[String],
    col_labels: &[String],
    opts: &GridOptions,
) -> Result<RgbImage> {
    let nrows = cells.len();
    let ncols = cells.iter().map(Vec::len).max().unwrap_or(0);
    ensure!(nrows > 0 && ncols > 0, "grid: no cells given");
    ensure!(
        opts.scale >= 1,
        "grid: scale must be >= 1, got {}",
        opts.scale
    );
    ensure!(
        opts.font_px > 0.0,
        "grid: font_px must be > 0, got {}",
        opts.font_px
    );
    ensure!(
        row_labels.is_empty() || row_labels.len() == nrows,
        "grid: {} row labels for {nrows} rows",
        row_labels.len()
    );
    ensure!(
        col_labels.is_empty() || col_labels.len() == ncols,
        "grid: {} column labels for {ncols} columns",
        col_labels.len()
    );
    let first = cells
        .iter()
        .find_map(|r| r.first())
        .context("grid: no cells given")?;
    let (w0, h0) = first.dimensions();
    ensure!(w0 > 0 && h0 > 0, "grid: cells must not be empty (0x0)");
    for (r, row) in cells.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            if img.dimensions() != (w0, h0) {
                bail!(
                    "grid: cell at row {r}, column {c} is {}x{}, expected {w0}x{h0} like the first cell",
                    img.width(),
                    img.height()
                );
            }
        }
    }

    let s = opts.scale;
    // The size of the grid, in u64 and bounded before anything is allocated (a huge scale must not wrap).
    {
        let (n_c, n_r, s64, g64) = (ncols as u64, nrows as u64, s as u64, opts.cell_gap as u64);
        let w = n_c
            .saturating_mul((w0 as u64).saturating_mul(s64))
            .saturating_add((n_c - 1) * g64);
        let h = n_r
            .saturating_mul((h0 as u64).saturating_mul(s64))
            .saturating_add((n_r - 1) * g64);
        diffpref_pipelines::limits::check_image_size(&format!("grid at scale {s}"), w, h)?;
    }
    let (cw, ch) = (w0 * s, h0 * s);
    let gap = opts.cell_gap;
    let px = opts.font_px;
    let lh = line_height(px).max(1);
    let pad = ((px / 4.0).round() as u32).max(2);

    let has_row_labels = row_labels.iter().any(|l| !l.trim().is_empty());
    let has_col_labels = col_labels.iter().any(|l| !l.trim().is_empty());

    let left = if !has_row_labels {
        0
    } else {
        match opts.row_label_width {
            Some(w) => w,
            None => {
                let widest = row_labels
                    .iter()
                    .map(|l| text_width(l.trim(), px))
                    .max()
                    .unwrap_or(0);
                widest.min(MAX_AUTO_ROW_LABEL_WIDTH) + 2 * pad
            }
        }
    };
    let col_text_w = cw.saturating_sub(2 * pad).max(1);
    let (top, col_lines) = if !has_col_labels {
        (0, 0)
    } else {
        match opts.label_height {
            Some(h) => (h, ((h.saturating_sub(2 * pad)) / lh).max(1) as usize),
            None => {
                let lines = col_labels
                    .iter()
                    .map(|l| fit_text(l, px, col_text_w, 2).len())
                    .max()
                    .unwrap_or(1)
                    .max(1);
                (lines as u32 * lh + 2 * pad, lines)
            }
        }
    };
    let x_origin = if left > 0 { left + gap } else { 0 };
    let y_origin = if top > 0 { top + gap } else { 0 };
    let width = x_origin + ncols as u32 * cw + (ncols as u32 - 1) * gap;
    let height = y_origin + nrows as u32 * ch + (nrows as u32 - 1) * gap;
    let mut out = RgbImage::from_pixel(width, height, opts.background);

    let cell_x = |c: usize| x_origin + c as u32 * (cw + gap);
    let cell_y = |r: usize| y_origin + r as u32 * (ch + gap);

    for (r, row) in cells.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let big = upscale(img, s);
            image::imageops::replace(&mut out, &big, i64::from(cell_x(c)), i64::from(cell_y(r)));
        }
    }

    if has_col_labels {
        for (c, label) in col_labels.iter().enumerate() {
            let lines = fit_text(label, px, col_text_w, col_lines);
            let block_h = lines.len() as i64 * i64::from(lh);
            let y0 = (i64::from(top) - block_h) / 2;
            let clip = Clip {
                x0: i64::from(cell_x(c)),
                y0: 0,
                x1: i64::from(cell_x(c) + cw),
                y1: i64::from(top),
            };
            for (i, line) in lines.iter().enumerate() {
                let tw = i64::from(text_width(line, px));
                let x = i64::from(cell_x(c)) + (i64::from(cw) - tw) / 2;
                let y = y0 + i as i64 * i64::from(lh);
                draw_text_clipped(
                    &mut out,
                    x as i32,
                    y as i32,
                    line,
                    px,
                    opts.text_color,
                    clip,
                );
            }
        }
    }

    if has_row_labels {
        let text_w = left.saturating_sub(2 * pad).max(1);
        let max_lines = (ch / lh).max(1) as usize;
        for (r, label) in row_labels.iter().enumerate() {
            let lines = fit_text(label, px, text_w, max_lines);
            let block_h = lines.len() as i64 * i64::from(lh);
            let y0 = i64::from(cell_y(r)) + (i64::from(ch) - block_h) / 2;
            let clip = Clip {
                x0: 0,
                y0: i64::from(cell_y(r)),
                x1: i64::from(left),
                y1: i64::from(cell_y(r) + ch),
            };
            for (i, line) in lines.iter().enumerate() {
                let y = y0 + i as i64 * i64::from(lh);
                draw_text_clipped(
                    &mut out,
                    pad as i32,
                    y as i32,
                    line,
                    px,
                    opts.text_color,
                    clip,
                );
            }
        }
    }
    Ok(out)
}

/// Incremental builder for [`grid`]: add rows one at a time, then [`Grid::render`].
#[derive(Clone, Debug, Default)]
pub struct Grid {
    rows: Vec<Vec<RgbImage>>,
    row_labels: Vec<String>,
    col_labels: Vec<String>,
    opts: GridOptions,
}

impl Grid {
    /// An empty grid with the given options.
    pub fn new(opts: GridOptions) -> Self {
        Grid {
            opts,
            ..Default::default()
        }
    }

    /// Sets the column labels (one per column, or none).
    pub fn col_labels<S: Into<String>>(
        &mut self,
        labels: impl IntoIterator<Item = S>,
    ) -> &mut Self {
        self.col_labels = labels.into_iter().map(Into::into).collect();
        self
    }

    /// Appends a row of cells with its label (`""` for none).
    pub fn row(&mut self, label: impl Into<String>, cells: Vec<RgbImage>) -> &mut Self {
        self.row_labels.push(label.into());
        self.rows.push(cells);
        self
    }

    /// Mutable access to the layout options.
    pub fn options_mut(&mut self) -> &mut GridOptions {
        &mut self.opts
    }

    /// Number of rows added so far.
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// Renders the grid (see [`grid`] for layout and errors).
    pub fn render(&self) -> Result<RgbImage> {
        grid(&self.rows, &self.row_labels, &self.col_labels, &self.opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::prelude::{Color, IntoDrawingArea, RGBColor, BLACK as BLACK_RGB};
    use plotters::style::text_anchor::Pos;

    const PX: f32 = 16.0;

    fn white(w: u32, h: u32) -> RgbImage {
        RgbImage::from_pixel(w, h, WHITE)
    }

    /// Set `DIFFPREF_IMAGING_DUMP=<dir>` to write the rendered test images (4× enlarged) for inspection.
    fn dump(name: &str, img: &RgbImage) {
        if let Some(dir) = std::env::var_os("DIFFPREF_IMAGING_DUMP") {
            let big = upscale(img, 4);
            save_png(&big, Path::new(&dir).join(name)).unwrap();
        }
    }

    /// Bounding box `(x0, y0, x1, y1)` (exclusive ends) of the pixels that differ from white.
    fn ink_box(img: &RgbImage) -> Option<(u32, u32, u32, u32)> {
        let mut b: Option<(u32, u32, u32, u32)> = None;
        for (x, y, p) in img.enumerate_pixels() {
            if *p != WHITE {
                b = Some(match b {
                    None => (x, y, x + 1, y + 1),
                    Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1)),
                });
            }
        }
        b
    }

    #[test]
    fn text_lands_in_its_box() {
        let mut img = white(240, 60);
        let (x, y) = (30, 12);
        let text = "Hello, Wordly";
        draw_text(&mut img, x, y, text, PX, BLACK);
        dump("text.png", &img);
        let (x0, y0, x1, y1) = ink_box(&img).expect("text drawn");
        let (tw, lh) = (text_width(text, PX), line_height(PX));
        // Inside the box [x, x + width] × [y, y + line height], give or take a pixel of anti-aliasing.
        assert!(x0 + 1 >= x as u32 && x0 <= x as u32 + 3, "left edge {x0}");
        assert!(x1 <= x as u32 + tw + 2, "right edge {x1} > {x} + {tw}");
        assert!(y0 + 1 >= y as u32 && y0 <= y as u32 + 4, "top edge {y0}");
        assert!(y1 <= y as u32 + lh + 1, "bottom edge {y1}");
        // The ink is about as wide as the measured text, and the descender of 'y' and ',' reach below the
        // cap height: most of the line's height is used.
        assert!(
            (x1 - x0).abs_diff(tw) <= 3,
            "ink {} vs text_width {tw}",
            x1 - x0
        );
        assert!(y1 - y0 >= lh * 3 / 4, "ink height {}", y1 - y0);
        // Dark strokes and anti-aliased edges.
        assert!(img.pixels().any(|p| p.0.iter().all(|&v| v < 60)));
        assert!(img.pixels().any(|p| p.0[0] > 60 && p.0[0] < 200));
        // Coloured text keeps its colour where the coverage is full.
        let mut red = white(120, 30);
        draw_text(&mut red, 2, 2, "Hi", PX, Rgb([200, 0, 0]));
        assert!(red.pixels().any(|p| p.0[0] >= 195 && p.0[1] < 10));
        assert!(red.pixels().all(|p| p.0[0] >= 195 && p.0[1] == p.0[2]));
    }

    #[test]
    fn lines_stack_at_the_line_height() {
        let lh = line_height(PX);
        let mut one = white(120, 80);
        draw_text(&mut one, 4, 4, "Agy", PX, BLACK);
        let mut two = white(120, 80);
        draw_text(&mut two, 4, 4, "Agy\nAgy", PX, BLACK);
        let a = ink_box(&one).unwrap();
        let b = ink_box(&two).unwrap();
        assert_eq!((b.0, b.1, b.2), (a.0, a.1, a.2));
        assert_eq!(b.3, a.3 + lh, "second line {lh} px below the first");
        // The second line is the first one shifted down.
        for yy in a.1..a.3 {
            for xx in a.0..a.2 {
                assert_eq!(one.get_pixel(xx, yy), two.get_pixel(xx, yy + lh));
            }
        }
        // Lines that far apart do not touch: the ink of one line is shorter than the line height.
        assert!(a.3 - a.1 < lh);
    }

    #[test]
    fn line_height_covers_what_plotters_underestimates() {
        // Plotters' size estimate gives px / 1.24 as the height, less than the ink of one line: the reason the
        // line height comes from the font's metrics.
        let (_, est) = font_desc(PX).box_size("ÉÅgjy|").unwrap();
        let mut img = white(200, 60);
        draw_text(&mut img, 4, 10, "ÉÅgjy|", PX, BLACK);
        let (_, y0, _, y1) = ink_box(&img).unwrap();
        assert!(
            y1 - y0 > est,
            "ink {} px, plotters' estimate {est}",
            y1 - y0
        );
        assert!(y1 - y0 <= line_height(PX) + 1, "ink {} px", y1 - y0);
        assert!(y0 >= 9, "accent above the line's top: {y0}");
    }

    #[test]
    fn text_width_grows_with_the_text() {
        assert_eq!(text_width("", PX), 0);
        let words = ["i", "ii", "iiW", "iiWW", "iiWW iiWW", "iiWW iiWW ."];
        let ws: Vec<u32> = words.iter().map(|w| text_width(w, PX)).collect();
        assert!(ws.windows(2).all(|w| w[1] > w[0]), "{ws:?}");
        assert!(text_width("W", PX) > 2 * text_width("i", PX));
        assert_eq!(text_width("ab\nabcdef\nabc", PX), text_width("abcdef", PX));
        // Twice the size, about twice the width.
        let (a, b) = (
            text_width("some label", 12.0),
            text_width("some label", 24.0),
        );
        assert!(b.abs_diff(2 * a) <= 3, "{a} {b}");
        // Within a few pixels of the drawn ink for ordinary labels.
        for t in ["base", "dpo, beta=5000", "A photo of a cat", "t=999"] {
            let mut img = white(300, 40);
            draw_text(&mut img, 10, 5, t, PX, BLACK);
            let (x0, _, x1, _) = ink_box(&img).unwrap();
            assert!(
                (x1 - x0).abs_diff(text_width(t, PX)) <= 3,
                "{t}: ink {} vs {}",
                x1 - x0,
                text_width(t, PX)
            );
        }
    }

    #[test]
    fn clipped_text_stays_in_its_clip() {
        let base = RgbImage::from_fn(100, 40, |x, y| {
            Rgb([255, 255 - (x % 7) as u8, 255 - (y % 5) as u8])
        });
        let clip = Clip {
            x0: 20,
            y0: 5,
            x1: 50,
            y1: 30,
        };
        let mut img = base.clone();
        draw_text_clipped(&mut img, 10, 8, "WWWWWWWWWWWW", PX, BLACK, clip);
        dump("clipped.png", &img);
        let mut inside = 0;
        for (x, y, p) in img.enumerate_pixels() {
            let within = (20..50).contains(&x) && (5..30).contains(&y);
            if !within {
                assert_eq!(
                    p,
                    base.get_pixel(x, y),
                    "pixel ({x},{y}) outside the clip changed"
                );
            } else if p.0.iter().all(|&v| v < 60) {
                inside += 1;
            }
        }
        assert!(inside > 30, "{inside} dark pixels inside the clip");
        // Text that misses the clip, or the image, draws nothing; a clip outside the image neither.
        for (x, y, clip) in [
            (60, 8, clip),
            (10, 32, clip),
            (500, 8, Clip::image(&base)),
            (-400, 8, Clip::image(&base)),
            (10, -30, Clip::image(&base)),
            (
                10,
                8,
                Clip {
                    x0: 200,
                    y0: 0,
                    x1: 300,
                    y1: 40,
                },
            ),
        ] {
            let mut img = base.clone();
            draw_text_clipped(&mut img, x, y, "WWW", PX, BLACK, clip);
            assert!(img == base, "drawn at ({x},{y})");
        }
        // Partly outside the image: what is inside is drawn.
        let mut img = base.clone();
        draw_text(&mut img, -10, -5, "clipped text that overflows", PX, BLACK);
        assert!(img != base);
    }

    #[test]
    fn grid_labels_stay_above_their_columns() {
        let cell = white(24, 24);
        let cells = vec![vec![cell.clone(), cell.clone(), cell]];
        let long = "WWWWWWWWWWWWWWWWWWWW".to_string();
        let opts = GridOptions {
            cell_gap: 6,
            background: Rgb([250, 250, 250]),
            ..Default::default()
        };
        let img = grid(
            &cells,
            &["row".into()],
            &[long.clone(), "x".into(), long],
            &opts,
        )
        .unwrap();
        dump("grid_labels.png", &img);
        let top = img.height() - 24 - 6;
        let left = img.width() - 3 * 24 - 2 * 6;
        // The gaps between the columns stay background in the label band: no label runs into its neighbour.
        for gap_x in [left + 24, left + 2 * 24 + 6] {
            for x in gap_x..gap_x + 6 {
                for y in 0..top {
                    assert_eq!(img.get_pixel(x, y).0, [250, 250, 250], "({x},{y})");
                }
            }
        }
        // Each label has ink above its own column.
        for c in 0..3 {
            let x0 = left + c * 30;
            let ink = (x0..x0 + 24)
                .flat_map(|x| (0..top).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 128)
                .count();
            assert!(ink > 3, "column {c}: {ink}");
        }
    }

    /// Ink extent `[left, right)` of each glyph of `text` as `render` draws it, in fractional pixels: glyph k's
    /// pixels are those that drawing the first k + 1 characters changes over drawing the first k; an edge
    /// column counts by its most changed pixel (the coverage of a stem's edge).
    fn glyph_ink(text: &str, render: impl Fn(&mut RgbImage, &str)) -> Vec<(f32, f32)> {
        let chars: Vec<char> = text.chars().collect();
        let (w, h) = (200, 40);
        let mut before = white(w, h);
        let mut out = Vec::new();
        for k in 1..=chars.len() {
            let mut after = white(w, h);
            render(&mut after, &chars[..k].iter().collect::<String>());
            let change: Vec<f32> = (0..w)
                .map(|x| {
                    (0..h)
                        .map(|y| before.get_pixel(x, y).0[0].abs_diff(after.get_pixel(x, y).0[0]))
                        .max()
                        .map_or(0.0, |d| f32::from(d) / 255.0)
                })
                .collect();
            let inked: Vec<usize> = (0..w as usize).filter(|&x| change[x] > 0.02).collect();
            let (l, r) = (inked[0], *inked.last().unwrap());
            out.push((l as f32 + 1.0 - change[l], r as f32 + change[r]));
            before = after;
        }
        out
    }

    /// The ink extents the font gives the glyphs of `text` at `px` with the pen starting at `x`: pen positions
    /// from advances and kerning, each glyph's outline from its left side bearing (x min) to its x max.
    fn font_ink(text: &str, px: f32, x: f32) -> Vec<(f32, f32)> {
        let f = font().as_scaled(PxScale::from(px));
        let mut pen = x;
        let mut prev: Option<GlyphId> = None;
        let mut out = Vec::new();
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                pen += f.kern(p, id);
            }
            let b = font().outline(id).unwrap().bounds;
            let s = f.h_scale_factor();
            out.push((pen + b.min.x * s, pen + b.max.x * s));
            pen += f.h_advance(id);
            prev = Some(id);
        }
        out
    }

    /// Largest difference between the gaps of consecutive glyphs' ink (and the first glyph's left edge) in
    /// `drawn` and in `ideal`.
    fn worst_gap_error(drawn: &[(f32, f32)], ideal: &[(f32, f32)]) -> f32 {
        let gaps = |v: &[(f32, f32)]| -> Vec<f32> {
            std::iter::once(v[0].0)
                .chain(v.windows(2).map(|w| w[1].0 - w[0].1))
                .collect()
        };
        gaps(drawn)
            .iter()
            .zip(gaps(ideal))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn letter_gaps_follow_the_font() {
        // Plotters' own text drawing drops each glyph's left side bearing and rounds the pen down ("He llo" at
        // 14 px); ours keeps both: every gap between two letters' ink is the font's (the advance and kerning
        // less the bearings) within a pixel, and so is where the first letter starts.
        let x = 10;
        for px in [14.0, 16.0, 24.0] {
            for text in ["Hello", "Wordly", "minimal"] {
                let ideal = font_ink(text, px, x as f32);
                let ours = glyph_ink(text, |img, t| draw_text(img, x, 5, t, px, BLACK));
                let err = worst_gap_error(&ours, &ideal);
                assert!(err <= 1.0, "{text} at {px}: {ours:?} vs {ideal:?}");
            }
        }
        // Plotters' rendering of the same text fails the check: what this renderer replaces.
        let plotters = |img: &mut RgbImage, t: &str| {
            let size = img.dimensions();
            let root = BitMapBackend::with_buffer(img, size).into_drawing_area();
            root.draw_text(t, &font_desc(14.0).color(&RGBColor(0, 0, 0)), (x, 5))
                .unwrap();
        };
        let theirs = glyph_ink("Hello", plotters);
        let err = worst_gap_error(&theirs, &font_ink("Hello", 14.0, x as f32));
        assert!(err > 1.0, "plotters: {err}");
    }

    #[test]
    fn chart_text_is_draw_text() {
        let (px, text, color) = (13.0, "Hello, Wordly\nline two", Rgb([40, 40, 40]));
        let style = font_desc(px).color(&RGBColor(40, 40, 40));
        let (w, h) = text_box(text, px);
        let (w, h) = (w as i32, h as i32);
        let mut expected = white(200, 80);
        draw_text(&mut expected, 30, 20, text, px, color);
        dump("chart_text.png", &expected);
        // Through the wrapper, the text box's anchor point at the given point: the same pixels.
        for (h_pos, v_pos, at) in [
            (HPos::Left, VPos::Top, (30, 20)),
            (HPos::Center, VPos::Center, (30 + w / 2, 20 + h / 2)),
            (HPos::Right, VPos::Bottom, (30 + w, 20 + h)),
            (HPos::Left, VPos::Bottom, (30, 20 + h)),
        ] {
            let mut img = white(200, 80);
            let root =
                TextBackend(BitMapBackend::with_buffer(&mut img, (200, 80))).into_drawing_area();
            let anchored = style.pos(Pos::new(h_pos, v_pos));
            assert_eq!(
                root.estimate_text_size(text, &anchored).unwrap(),
                (w as u32, h as u32)
            );
            root.draw_text(text, &anchored, at).unwrap();
            drop(root);
            assert!(img == expected, "anchored at {at:?}");
        }
        // Turned a quarter: the upright text's pixels turned the same way (Rotate270 reads bottom to top).
        let (cw, ch) = (w as u32 + 7, h as u32 + 5);
        let mut upright = white(cw, ch);
        draw_text(&mut upright, 0, 0, text, px, color);
        for (transform, at, turn) in [
            (
                FontTransform::Rotate270,
                (0, cw as i32),
                image::imageops::rotate270 as fn(&RgbImage) -> RgbImage,
            ),
            (
                FontTransform::Rotate90,
                (ch as i32, 0),
                image::imageops::rotate90,
            ),
            (
                FontTransform::Rotate180,
                (cw as i32, ch as i32),
                image::imageops::rotate180,
            ),
        ] {
            let (tw, th) = if matches!(transform, FontTransform::Rotate180) {
                (cw, ch)
            } else {
                (ch, cw)
            };
            let mut img = white(tw, th);
            let root =
                TextBackend(BitMapBackend::with_buffer(&mut img, (tw, th))).into_drawing_area();
            root.draw_text(text, &style.transform(transform), at)
                .unwrap();
            drop(root);
            assert!(img == turn(&upright), "turned to {at:?}");
            assert!(img != white(tw, th));
        }
        // Translucent colours blend their alpha with the coverage.
        let mut img = white(200, 80);
        let root = TextBackend(BitMapBackend::with_buffer(&mut img, (200, 80))).into_drawing_area();
        root.draw_text(text, &font_desc(px).color(&BLACK_RGB.mix(0.5)), (30, 20))
            .unwrap();
        drop(root);
        assert!(
            img.pixels().all(|p| p.0[0] >= 126),
            "half-transparent black"
        );
        assert!(img.pixels().any(|p| p.0[0] < 130));
    }
}
