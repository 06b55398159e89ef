//! Size bounds checked before anything is allocated: every image side and pixel count the toolkit creates or
//! decodes goes through [`check_image_size`], with checked arithmetic, so an absurd size is an error naming
//! the value and the limit instead of an allocation abort or a silent wrap-around.
//!
//! The limit is [`DEFAULT_MAX_SIDE`] pixels per side and its square in pixels; `DIFFPREF_MAX_SIDE` raises it
//! for users who really need larger images.

use crate::error::{Error, Result};

/// The default largest image side in pixels (8192: four times SDXL's 2048-px upscales).
pub const DEFAULT_MAX_SIDE: u64 = 8192;

/// The largest image side in pixels: `DIFFPREF_MAX_SIDE` when set to a positive integer, else
/// [`DEFAULT_MAX_SIDE`].
pub fn max_side() -> u64 {
    std::env::var("DIFFPREF_MAX_SIDE")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(DEFAULT_MAX_SIDE)
}

/// Checks a `width` × `height` image (named `what` in the error) against the limit; returns the pixel count.
pub fn check_image_size(what: &str, width: u64, height: u64) -> Result<u64> {
    let max = max_side();
    let pixels = width.checked_mul(height);
    match pixels {
        Some(p) if width > 0 && height > 0 && width <= max && height <= max => Ok(p),
        _ => Err(Error::msg(format!(
            "{what}: {width}x{height} pixels is outside 1..={max} per side (set DIFFPREF_MAX_SIDE to allow \
             larger images)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_within_the_limit_pass_and_others_name_the_value() {
        assert_eq!(check_image_size("x", 512, 768).unwrap(), 512 * 768);
        let e = check_image_size("--width", 100_000, 512)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--width") && e.contains("100000") && e.contains("DIFFPREF_MAX_SIDE"),
            "{e}"
        );
        assert!(check_image_size("x", 0, 5).is_err());
        assert!(check_image_size("x", u64::MAX, u64::MAX).is_err());
    }
}
