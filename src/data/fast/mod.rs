//! The loader's transforms in u8: a crop-aware SIMD resize straight from the decoded image into
//! the image's slot, then flip and colour jitter fused into one pass over the slot. Nothing is
//! allocated per image once a thread's [`Scratch`] has grown to the image size. Normalisation to
//! f32 happens once: when the batch is packed for the CPU ([`normalize_u8_into`]), on the device
//! for CUDA.
//!
//! An image whose jitter stretches differences by more than [`U8_RESIZE_MAX_GAIN`] is resized
//! at 16-bit precision (the crop widened to u16, resized, jittered from the u16 result) and
//! rounded to u8 once, at the end: brightness, contrast and saturation stretch the values, so a
//! rounding made before them would grow with their factors (up to about 2.7 levels for a
//! 1.4 x 1.4 x 1.4 draw) and break the 2/255 bound against the reference.
//!
//! They follow the f32 reference transforms of [`super::transform`] (same draws, same filter:
//! a triangle filter widened when shrinking, as PIL's antialiased bilinear resize), differing only
//! by u8 rounding (`tests/data_transform.rs` bounds the difference).

use super::decode::DecodedImage;
use super::transform::{CropBox, Normalization, TrainDraws};
use crate::ops::normalize::normalize_u8;
use anyhow::{Context, Result};
use fast_image_resize as fir;

/// Per-thread buffers of the u8 transforms.
#[derive(Default)]
pub struct Scratch {
    resizer: fir::Resizer,
    /// One output row, planar (r, g, b), for the jitter pass.
    planes: Vec<f32>,
    /// The crop's source pixels widened to u16 (x 257), for the 16-bit resize of jittered images.
    wide_src: Vec<u16>,
    /// The 16-bit resize result that the jitter pass reads.
    wide_out: Vec<u16>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch").finish_non_exhaustive()
    }
}

/// A source window in the decoded image's pixel coordinates (fractional when the image was
/// decoded at a reduced scale, or for the evaluation crop).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Region {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
    /// Read only the pixels of the smallest whole-pixel box around the window, as if it were cut
    /// out first (training crops); otherwise the filter may reach past the window's edges into
    /// the rest of the image (evaluation).
    pub bounded: bool,
}

impl Region {
    /// The training crop `crop` of the `full` (width, height) image, in the coordinates of that
    /// image decoded at `decoded` (width, height).
    pub fn train(crop: CropBox, full: (usize, usize), decoded: (usize, usize)) -> Self {
        let sx = decoded.0 as f64 / full.0 as f64;
        let sy = decoded.1 as f64 / full.1 as f64;
        Self {
            x: crop.x as f64 * sx,
            y: crop.y as f64 * sy,
            width: crop.width as f64 * sx,
            height: crop.height as f64 * sy,
            bounded: true,
        }
    }

    /// Evaluation's window (torchvision's `Resize(resize)` then `CenterCrop(size)`) in the
    /// coordinates of the `full` image decoded at `decoded`.
    pub fn eval(full: (usize, usize), decoded: (usize, usize), resize: usize, size: usize) -> Self {
        let short = full.0.min(full.1);
        let resize = resize.max(size);
        // torchvision truncates the longer side: int(resize * long / short).
        let axis = |len: usize, dec: usize| {
            let rlen = if len == short {
                resize
            } else {
                (resize * len / short).max(resize)
            };
            // CenterCrop's int(round((rlen - size) / 2)): Python rounds half to even.
            let offset = ((rlen - size) as f64 / 2.0).round_ties_even();
            let step = len as f64 / rlen as f64;
            let s = dec as f64 / len as f64;
            (offset * step * s, size as f64 * step * s)
        };
        let (x, width) = axis(full.0, decoded.0);
        let (y, height) = axis(full.1, decoded.1);
        Self {
            x,
            y,
            width,
            height,
            bounded: false,
        }
    }

    /// The smaller side of the window, in decoded pixels.
    pub fn min_side(&self) -> f64 {
        self.width.min(self.height)
    }
}

/// The smallest whole-pixel box `(x0, y0, x1, y1)` of a `width` x `height` image around `region`.
fn pixel_box(region: &Region, width: usize, height: usize) -> (usize, usize, usize, usize) {
    let x0 = (region.x.floor().max(0.0) as usize).min(width - 1);
    let y0 = (region.y.floor().max(0.0) as usize).min(height - 1);
    let x1 = ((region.x + region.width).ceil() as usize).clamp(x0 + 1, width);
    let y1 = ((region.y + region.height).ceil() as usize).clamp(y0 + 1, height);
    (x0, y0, x1, y1)
}

/// The resize options of `region` once the source is cut to `bx` (a bounded region's crop is
/// relative to its pixel box).
fn crop_options(region: &Region, bx: (usize, usize, usize, usize)) -> fir::ResizeOptions {
    let (x0, y0, x1, y1) = bx;
    let opts = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
    opts.crop(
        (region.x - x0 as f64).max(0.0),
        (region.y - y0 as f64).max(0.0),
        region.width.min((x1 - x0) as f64),
        region.height.min((y1 - y0) as f64),
    )
}

/// Resizes `region` of `img` to `size` x `size` RGB u8 in `out` (`size * size * 3` bytes).
pub fn resize_region_u8(
    img: &DecodedImage,
    region: Region,
    size: usize,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<()> {
    let src = fir::images::ImageRef::new(
        img.width as u32,
        img.height as u32,
        &img.pixels,
        fir::PixelType::U8x3,
    )
    .context("decoded image buffer")?;
    let mut dst =
        fir::images::Image::from_slice_u8(size as u32, size as u32, out, fir::PixelType::U8x3)
            .context("output slot")?;
    if region.bounded {
        let bx = pixel_box(&region, img.width, img.height);
        let (x0, y0, x1, y1) = bx;
        let view = fir::images::CroppedImage::new(
            &src,
            x0 as u32,
            y0 as u32,
            (x1 - x0) as u32,
            (y1 - y0) as u32,
        )?;
        scratch
            .resizer
            .resize(&view, &mut dst, &crop_options(&region, bx))?;
    } else {
        let opts = fir::ResizeOptions::new()
            .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear))
            .crop(region.x, region.y, region.width, region.height);
        scratch.resizer.resize(&src, &mut dst, &opts)?;
    }
    Ok(())
}

/// Resizes the bounded `region` of `img` to `size` x `size` RGB at 16-bit precision (0..=65535,
/// u8 values x 257) into `scratch.wide_out`: the region's pixel box is widened into
/// `scratch.wide_src` first, so only the pixels the filter reads are converted.
fn resize_region_u16(
    img: &DecodedImage,
    region: Region,
    size: usize,
    scratch: &mut Scratch,
) -> Result<()> {
    let bx = pixel_box(&region, img.width, img.height);
    let (x0, y0, x1, y1) = bx;
    let (w, h) = (x1 - x0, y1 - y0);
    scratch.wide_src.resize(w * h * 3, 0);
    for (dst, y) in scratch.wide_src.chunks_exact_mut(w * 3).zip(y0..y1) {
        let row = &img.pixels[(y * img.width + x0) * 3..(y * img.width + x1) * 3];
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = v as u16 * 257;
        }
    }
    scratch.wide_out.resize(size * size * 3, 0);
    let src = fir::images::ImageRef::new(
        w as u32,
        h as u32,
        bytemuck::cast_slice(&scratch.wide_src),
        fir::PixelType::U16x3,
    )
    .context("widened crop")?;
    let mut dst = fir::images::Image::from_slice_u8(
        size as u32,
        size as u32,
        bytemuck::cast_slice_mut(&mut scratch.wide_out),
        fir::PixelType::U16x3,
    )
    .context("16-bit resize buffer")?;
    let full = (0, 0, w, h);
    let local = Region {
        x: region.x - x0 as f64,
        y: region.y - y0 as f64,
        ..region
    };
    scratch
        .resizer
        .resize(&src, &mut dst, &crop_options(&local, full))?;
    Ok(())
}

/// The training transform in u8: the drawn crop of the `full` (width, height) image, read from
/// `img` (that image decoded at full or reduced scale), resized into `out`, then flipped and
/// jittered in one pass. `out` holds `size * size * 3` bytes of RGB.
pub fn train_u8_into(
    img: &DecodedImage,
    full: (usize, usize),
    draws: &TrainDraws,
    size: usize,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<()> {
    let region = Region::train(draws.crop, full, (img.width, img.height));
    match &draws.jitter {
        Some(ops) if jitter_gain(ops) > U8_RESIZE_MAX_GAIN => {
            resize_region_u16(img, region, size, scratch)?;
            scratch.planes.resize(3 * size, 0.0);
            let wide = Some(scratch.wide_out.as_slice());
            jitter_rows(
                wide,
                out,
                size,
                draws.flip,
                ops,
                &mut scratch.planes,
                avx2(),
            );
        }
        jitter => {
            resize_region_u8(img, region, size, out, scratch)?;
            flip_jitter_u8(out, size, draws.flip, jitter.as_ref(), scratch);
        }
    }
    Ok(())
}

/// The most a jitter draw may stretch differences (see [`jitter_gain`]) for its image to be
/// resized in u8. The u8 resize is within about 1 level of the f32 reference (1.003 at worst in
/// tests/data_fast.rs); the jitter multiplies that by at most its gain and the final rounding
/// adds half a level: at most 1.4 x 1.003 + 0.5 = 1.91 levels, inside the 2-level bound. Draws
/// that stretch more (32% of them at jitter 0.4, three factors uniform in 0.6..1.4) take the
/// 16-bit resize, which costs about 2.5 times the u8 one, so the rest keep the u8 speed.
const U8_RESIZE_MAX_GAIN: f32 = 1.4;

/// How much a jitter draw can stretch a difference between two pixels: brightness scales by its
/// factor, contrast and saturation stretch about a mean or grey by theirs, so the product of the
/// factors above 1.
fn jitter_gain(ops: &[(u8, f32); 3]) -> f32 {
    ops.iter().map(|o| o.1.max(1.0)).product()
}

/// The evaluation transform in u8 (resize the shorter side to `resize`, centre crop `size`) of
/// the `full` image decoded as `img`.
pub fn eval_u8_into(
    img: &DecodedImage,
    full: (usize, usize),
    resize: usize,
    size: usize,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<()> {
    let region = Region::eval(full, (img.width, img.height), resize, size);
    resize_region_u8(img, region, size, out, scratch)
}

/// Splits one interleaved RGB row into the three planes (eight pixels at a time, so that it
/// vectorises).
#[inline(always)]
fn load_row(row: &[u8], planes: &mut [f32], n: usize, avx2: bool) {
    let (r, rest) = planes.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is only true when the CPU has AVX2.
        let done = unsafe { simd::load_row(&row[..3 * n], r, g, b) };
        for i in done..n {
            r[i] = row[3 * i] as f32;
            g[i] = row[3 * i + 1] as f32;
            b[i] = row[3 * i + 2] as f32;
        }
        return;
    }
    let full = n / 8 * 8;
    for (((px, r), g), b) in row[..3 * full]
        .chunks_exact(24)
        .zip(r.chunks_exact_mut(8))
        .zip(g.chunks_exact_mut(8))
        .zip(b.chunks_exact_mut(8))
    {
        let px: &[u8; 24] = px.try_into().unwrap();
        for l in 0..8 {
            r[l] = px[3 * l] as f32;
            g[l] = px[3 * l + 1] as f32;
            b[l] = px[3 * l + 2] as f32;
        }
    }
    for i in full..n {
        r[i] = row[3 * i] as f32;
        g[i] = row[3 * i + 1] as f32;
        b[i] = row[3 * i + 2] as f32;
    }
}

/// `v = clamp(f * v + m, 0, 255)` over a plane (the reference's `blend` with a constant other).
#[inline(always)]
fn blend_const(plane: &mut [f32], f: f32, m: f32) {
    let mut c = plane.chunks_exact_mut(8);
    for v in &mut c {
        for v in v.iter_mut() {
            *v = (f * *v + m).clamp(0.0, 255.0);
        }
    }
    for v in c.into_remainder() {
        *v = (f * *v + m).clamp(0.0, 255.0);
    }
}

/// The sum of the grey values of one row's planes, in eight lanes (so that it vectorises).
#[inline(always)]
fn grey_sum(planes: &[f32], n: usize, avx2: bool) -> f64 {
    let (r, rest) = planes.split_at(n);
    let (g, b) = rest.split_at(n);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: as in `load_row`.
        let (mut sum, done) = unsafe { simd::grey_sum(r, &g[..n], &b[..n]) };
        for j in done..n {
            sum += (0.299 * r[j] + 0.587 * g[j] + 0.114 * b[j]) as f64;
        }
        return sum;
    }
    let mut acc = [0.0f32; 8];
    let mut i = 0;
    while i + 8 <= n {
        for l in 0..8 {
            acc[l] += 0.299 * r[i + l] + 0.587 * g[i + l] + 0.114 * b[i + l];
        }
        i += 8;
    }
    let mut sum: f64 = acc.iter().map(|&v| v as f64).sum();
    for j in i..n {
        sum += (0.299 * r[j] + 0.587 * g[j] + 0.114 * b[j]) as f64;
    }
    sum
}

/// Applies the jitter operations to one row's planes (the reference's `blend`, on planes so
/// that it vectorises).
#[inline(always)]
fn apply_ops(planes: &mut [f32], n: usize, ops: &[(u8, f32)], mean: f32, avx2: bool) {
    let (r, rest) = planes.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for &(op, f) in ops {
        let k = 1.0 - f;
        match op {
            0 | 1 => {
                let m = if op == 0 { k * 0.0 } else { k * mean };
                for p in [&mut *r, &mut *g, &mut *b] {
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: `avx2` is only true when the CPU has AVX2.
                        unsafe { simd::blend_const(p, f, m) };
                        continue;
                    }
                    blend_const(p, f, m);
                }
            }
            _ => {
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: as above.
                    done = unsafe { simd::saturate(r, g, b, f) };
                }
                let c = |v: f32| v.clamp(0.0, 255.0);
                let rem = r[done..].iter_mut().zip(&mut g[done..]).zip(&mut b[done..]);
                for ((r, g), b) in rem {
                    let m = k * (0.299 * *r + 0.587 * *g + 0.114 * *b);
                    *r = c(f * *r + m);
                    *g = c(f * *g + m);
                    *b = c(f * *b + m);
                }
            }
        }
    }
}

/// AVX2 versions of the plane operations, with the reference's arithmetic (separate multiply
/// and add, no fused rounding).
#[cfg(target_arch = "x86_64")]
mod simd;

/// Interleaves the planes back into a u8 row (rounded), mirrored when `flip`. Values are in
/// 0..=255 already.
#[inline(always)]
fn store_row(planes: &mut [f32], n: usize, row: &mut [u8], flip: bool, avx2: bool) {
    let (r, rest) = planes.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    if flip {
        r.reverse();
        g.reverse();
        b.reverse();
    }
    let q = |v: f32| (v + 0.5) as i32 as u8;
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: as in `load_row`.
        let done = unsafe { simd::store_row(r, &g[..n], &b[..n], &mut row[..3 * n]) };
        for i in done..n {
            row[3 * i] = q(r[i]);
            row[3 * i + 1] = q(g[i]);
            row[3 * i + 2] = q(b[i]);
        }
        return;
    }
    let full = n / 8 * 8;
    for (((px, r), g), b) in row[..3 * full]
        .chunks_exact_mut(24)
        .zip(r.chunks_exact(8))
        .zip(g.chunks_exact(8))
        .zip(b.chunks_exact(8))
    {
        let mut out = [0u8; 24];
        for l in 0..8 {
            out[3 * l] = q(r[l]);
            out[3 * l + 1] = q(g[l]);
            out[3 * l + 2] = q(b[l]);
        }
        px.copy_from_slice(&out);
    }
    for i in full..n {
        row[3 * i] = q(r[i]);
        row[3 * i + 1] = q(g[i]);
        row[3 * i + 2] = q(b[i]);
    }
}

/// Flip and colour jitter of a `size` x `size` RGB u8 image in one pass over it (a second,
/// read-only pass first when the contrast step needs the mean grey of what precedes it).
pub fn flip_jitter_u8(
    img: &mut [u8],
    size: usize,
    flip: bool,
    jitter: Option<&[(u8, f32); 3]>,
    scratch: &mut Scratch,
) {
    let row_len = size * 3;
    let Some(ops) = jitter else {
        if flip {
            for row in img.chunks_exact_mut(row_len) {
                for x in 0..size / 2 {
                    let (a, b) = (x * 3, (size - 1 - x) * 3);
                    for c in 0..3 {
                        row.swap(a + c, b + c);
                    }
                }
            }
        }
        return;
    };
    scratch.planes.resize(3 * size, 0.0);
    jitter_rows(None, img, size, flip, ops, &mut scratch.planes, avx2());
}

/// Whether the AVX2 plane operations can run.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Splits one interleaved RGB row of 16-bit values (u8 x 257) into planes in 0..=255.
#[inline(always)]
fn load_row_wide(row: &[u16], planes: &mut [f32], n: usize) {
    let (r, rest) = planes.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    const INV: f32 = 1.0 / 257.0;
    for (((px, r), g), b) in row[..3 * n].chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = px[0] as f32 * INV;
        *g = px[1] as f32 * INV;
        *b = px[2] as f32 * INV;
    }
}

/// The jitter pass over a `size` x `size` image: reads each row from `wide` (a 16-bit resize
/// result) when given, else from `img` itself, and writes the jittered, flipped row to `img`.
fn jitter_rows(
    wide: Option<&[u16]>,
    img: &mut [u8],
    size: usize,
    flip: bool,
    ops: &[(u8, f32); 3],
    planes: &mut [f32],
    avx2: bool,
) {
    let row_len = size * 3;
    let load = |y: usize, img: &[u8], planes: &mut [f32]| match wide {
        Some(w) => load_row_wide(&w[y * row_len..(y + 1) * row_len], planes, size),
        None => load_row(&img[y * row_len..(y + 1) * row_len], planes, size, avx2),
    };
    let mut mean = 0.0f32;
    if let Some(k) = ops.iter().position(|o| o.0 == 1) {
        let mut sum = 0.0f64;
        for y in 0..size {
            load(y, img, planes);
            apply_ops(planes, size, &ops[..k], 0.0, avx2);
            sum += grey_sum(planes, size, avx2);
        }
        mean = (sum / (size * size) as f64) as f32;
    }
    for y in 0..size {
        load(y, img, planes);
        apply_ops(planes, size, ops, mean, avx2);
        store_row(
            planes,
            size,
            &mut img[y * row_len..(y + 1) * row_len],
            flip,
            avx2,
        );
    }
}

/// RGB u8 (0..=255) -> `(x / 255 - mean) / std` per channel, written to `dst`: the op's CPU
/// reference, which the CUDA trainer's device normalisation is checked against.
pub fn normalize_u8_into(src: &[u8], dst: &mut [f32], norm: &Normalization) {
    normalize_u8(src, dst, &norm.factors());
}
