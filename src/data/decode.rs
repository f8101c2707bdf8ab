//! Decoding encoded image bytes (JPEG baseline/progressive, PNG) to RGB u8.

use anyhow::{bail, Context, Result};

/// A decoded image: `height` rows of `width` RGB pixels, u8, channel fastest (HWC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes.
    pub pixels: Vec<u8>,
}

impl DecodedImage {
    /// The RGB triple at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// Decodes JPEG or PNG bytes. The format comes from the bytes' signature, not the file name, so a
/// mis-named file still decodes. Grey becomes three equal channels; alpha is dropped.
pub fn decode_image(bytes: &[u8]) -> Result<DecodedImage> {
    let format = image::guess_format(bytes).context("not a recognised image format")?;
    if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        bail!("unsupported image format {format:?} (only JPEG and PNG)");
    }
    let img = image::load_from_memory_with_format(bytes, format).context("cannot decode image")?;
    let rgb = img.into_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    if width == 0 || height == 0 {
        bail!("image has zero size ({width}x{height})");
    }
    Ok(DecodedImage {
        width,
        height,
        pixels: rgb.into_raw(),
    })
}
