//! Training and evaluation transforms: decoded RGB u8 image -> normalised f32 HWC tensor.
//!
//! Training follows torchvision's `RandomResizedCrop` + `RandomHorizontalFlip` + `ColorJitter`
//! (what the MindSpore recipe uses); evaluation resizes the shorter side and centre-crops, to
//! the output size itself or, with a crop fraction below 1 (timm's `crop_pct`), to
//! `floor(size / crop_pct)` first.
//! Resizing is bilinear with a triangle filter widened when shrinking (like PIL and torchvision's
//! antialiased resize), so downscaled images do not alias.

use super::decode::DecodedImage;
use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use rand::Rng;

pub use super::fast::{
    eval_u8_into, normalize_u8_into, resize_region_u8, train_u8_into, Region, Scratch,
};

/// ImageNet channel means and standard deviations, applied after scaling to [0, 1].
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The per-channel normalisation after scaling pixels to [0, 1]: (x - mean) / std.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// The ImageNet statistics: what the engine trains with.
    pub const IMAGENET: Normalization = Normalization {
        mean: MEAN,
        std: STD,
    };
    /// Mean = std = 0.5 (pixels to [-1, 1]): what timm's pretrained `inception_v4` weights expect.
    pub const INCEPTION: Normalization = Normalization {
        mean: [0.5; 3],
        std: [0.5; 3],
    };

    /// The per-channel multiply and add of the u8 normalisation (CPU packing and the device).
    pub fn factors(&self) -> crate::ops::normalize::Factors {
        crate::ops::normalize::Factors::new(self.mean, self.std)
    }
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization::IMAGENET
    }
}

/// Training augmentation settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentConfig {
    /// Range of the crop's area as a fraction of the image area.
    pub scale: (f32, f32),
    /// Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    pub ratio: (f32, f32),
    /// Probability of a horizontal flip.
    pub flip_prob: f32,
    /// Colour jitter strength for brightness, contrast and saturation; 0 disables it.
    pub jitter: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_prob: 0.5,
            jitter: 0.4,
        }
    }
}

impl AugmentConfig {
    pub fn validate(&self) -> Result<()> {
        let (s0, s1) = self.scale;
        let (r0, r1) = self.ratio;
        ensure!(
            0.0 < s0 && s0 <= s1,
            "crop area range {s0}..{s1} must satisfy 0 < min <= max"
        );
        ensure!(
            0.0 < r0 && r0 <= r1,
            "crop aspect range {r0}..{r1} must satisfy 0 < min <= max"
        );
        ensure!(
            (0.0..=1.0).contains(&self.flip_prob),
            "flip probability must be in [0, 1]"
        );
        ensure!(self.jitter >= 0.0, "colour jitter strength must be >= 0");
        Ok(())
    }
}

/// A rectangle of source pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

/// The random draws of one training transform, made in the order [`train_transform`] always
/// made them: the crop box, the flip, then (when jitter is on) the order of the three jitter
/// operations and their factors. Drawing them first lets the loader pick a decoding scale from
/// the crop before it decodes.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainDraws {
    pub crop: CropBox,
    pub flip: bool,
    /// (operation, factor) in application order: 0 brightness, 1 contrast, 2 saturation.
    pub jitter: Option<[(u8, f32); 3]>,
}

/// Draws the crop, flip and jitter of a training transform for a `width` x `height` image.
pub fn draw_train(
    width: usize,
    height: usize,
    cfg: &AugmentConfig,
    rng: &mut impl Rng,
) -> TrainDraws {
    let crop = random_resized_crop_box(width, height, cfg.scale, cfg.ratio, rng);
    let flip = rng.random::<f32>() < cfg.flip_prob;
    let jitter = (cfg.jitter > 0.0).then(|| {
        let mut order = [0u8, 1, 2];
        order.shuffle(rng);
        let lo = (1.0 - cfg.jitter as f64).max(0.0);
        let hi = 1.0 + cfg.jitter as f64;
        order.map(|op| (op, uniform(rng, lo, hi) as f32))
    });
    TrainDraws { crop, flip, jitter }
}

/// Training transform: random resized crop to `size` x `size`, flip, colour jitter, normalise.
/// All randomness comes from `rng`, so a seeded rng gives a reproducible result. This is the
/// f32 reference; the loader runs the same draws through [`train_u8_into`] and normalises when
/// it packs the batch.
pub fn train_transform(
    img: &DecodedImage,
    size: usize,
    cfg: &AugmentConfig,
    norm: &Normalization,
    rng: &mut impl Rng,
) -> Vec<f32> {
    let draws = draw_train(img.width, img.height, cfg, rng);
    let mut out = resize_crop(img, draws.crop, size);
    if draws.flip {
        flip_horizontal(&mut out, size);
    }
    if let Some(ops) = draws.jitter {
        colour_jitter(&mut out, &ops);
    }
    normalize(&mut out, norm);
    out
}

/// Evaluation transform: resize the shorter side to `size`, centre crop `size` x `size`,
/// normalise.
pub fn eval_transform(img: &DecodedImage, size: usize, norm: &Normalization) -> Vec<f32> {
    eval_transform_crop(img, size, 1.0, norm)
}

/// Evaluation transform with timm's crop fraction: resize the shorter side to
/// [`eval_resize`]`(size, crop_pct)`, centre crop `size` x `size`, normalise.
pub fn eval_transform_crop(
    img: &DecodedImage,
    size: usize,
    crop_pct: f64,
    norm: &Normalization,
) -> Vec<f32> {
    let mut out = resize_shorter_then_centre_crop(img, eval_resize(size, crop_pct), size);
    normalize(&mut out, norm);
    out
}

/// The shorter side's length before the centre crop of `size` pixels covering the fraction
/// `crop_pct` of it: timm's `floor(size / crop_pct)` (`size` itself at 1).
pub fn eval_resize(size: usize, crop_pct: f64) -> usize {
    // The epsilon keeps an exact quotient (224 / 0.875 = 256) from landing just below.
    ((size as f64 / crop_pct + 1e-9).floor() as usize).max(size)
}

/// Checks a crop fraction: `0 < crop_pct <= 1`.
pub fn check_crop_pct(crop_pct: f64) -> Result<()> {
    ensure!(
        crop_pct > 0.0 && crop_pct <= 1.0,
        "--crop-pct must be in (0, 1], not {crop_pct}"
    );
    Ok(())
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    // Not `random_range`, which rejects an empty range: lo == hi is a valid setting.
    lo + (hi - lo) * rng.random::<f64>()
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a random area and aspect ratio,
/// then a centre crop clamped to the ratio range.
pub fn random_resized_crop_box(
    width: usize,
    height: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut impl Rng,
) -> CropBox {
    let area = (width * height) as f64;
    let (log_r0, log_r1) = ((ratio.0 as f64).ln(), (ratio.1 as f64).ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0 as f64, scale.1 as f64);
        let aspect = uniform(rng, log_r0, log_r1).exp();
        let w = (target_area * aspect).sqrt().round() as usize;
        let h = (target_area / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return CropBox {
                x,
                y,
                width: w,
                height: h,
            };
        }
    }
    centre_crop_box(width, height, ratio)
}

fn centre_crop_box(width: usize, height: usize, ratio: (f32, f32)) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 as f64 {
        (
            width,
            ((width as f64 / ratio.0 as f64).round() as usize).clamp(1, height),
        )
    } else if in_ratio > ratio.1 as f64 {
        (
            ((height as f64 * ratio.1 as f64).round() as usize).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        x: (width - w) / 2,
        y: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// Resizes the `crop` region of `img` to `size` x `size`. Values stay in 0..=255, f32, HWC.
pub fn resize_crop(img: &DecodedImage, crop: CropBox, size: usize) -> Vec<f32> {
    let ax = AxisTaps::new(
        crop.x,
        crop.x + crop.width,
        crop.x as f64,
        crop.width as f64 / size as f64,
        size,
    );
    let ay = AxisTaps::new(
        crop.y,
        crop.y + crop.height,
        crop.y as f64,
        crop.height as f64 / size as f64,
        size,
    );
    resample(img, &ax, &ay)
}

/// torchvision's `Resize(size)` + `CenterCrop(size)` done as one resampling pass.
pub fn resize_shorter_and_centre_crop(img: &DecodedImage, size: usize) -> Vec<f32> {
    resize_shorter_then_centre_crop(img, size, size)
}

/// torchvision's `Resize(resize)` + `CenterCrop(size)` (`resize >= size`) done as one resampling
/// pass: the crop window is mapped back to source coordinates, so nothing outside it is
/// computed.
pub fn resize_shorter_then_centre_crop(img: &DecodedImage, resize: usize, size: usize) -> Vec<f32> {
    let (w, h) = (img.width, img.height);
    let short = w.min(h);
    let resize = resize.max(size);
    // torchvision truncates the longer side: int(resize * long / short).
    let resized = |len: usize| {
        if len == short {
            resize
        } else {
            (resize * len / short).max(resize)
        }
    };
    let axis = |len: usize| {
        let rlen = resized(len);
        // CenterCrop's int(round((rlen - size) / 2)): Python rounds half to even.
        let offset = ((rlen - size) as f64 / 2.0).round_ties_even();
        let step = len as f64 / rlen as f64;
        AxisTaps::new(0, len, offset * step, step, size)
    };
    resample(img, &axis(w), &axis(h))
}

/// For each output pixel along one axis, the source pixels it reads and their weights.
struct AxisTaps {
    /// Per output pixel: first source index and number of taps.
    spans: Vec<(usize, usize)>,
    /// Per output pixel: `stride` weights, the first `n` used.
    weights: Vec<f32>,
    stride: usize,
}

impl AxisTaps {
    /// Output pixel `o` is centred on source coordinate `start + (o + 0.5) * step`; only source
    /// pixels in `lo..hi` are read (their weights renormalised), as if the region were cut out
    /// first.
    fn new(lo: usize, hi: usize, start: f64, step: f64, out_len: usize) -> Self {
        // Shrinking widens the filter to cover every source pixel (antialiasing); enlarging
        // keeps plain bilinear interpolation.
        let radius = step.max(1.0);
        let stride = (2.0 * radius).ceil() as usize + 2;
        let mut spans = Vec::with_capacity(out_len);
        let mut weights = vec![0.0f32; out_len * stride];
        for o in 0..out_len {
            let centre = start + (o as f64 + 0.5) * step;
            let first = ((centre - radius).floor().max(lo as f64) as usize).min(hi - 1);
            let last = ((centre + radius).ceil() as usize).clamp(first + 1, hi);
            let row = &mut weights[o * stride..(o + 1) * stride];
            let mut sum = 0.0;
            for (t, k) in (first..last).enumerate() {
                let d = ((k as f64 + 0.5 - centre) / radius).abs();
                row[t] = (1.0 - d).max(0.0) as f32;
                sum += row[t];
            }
            if sum <= 0.0 {
                // The centre sits on a pixel boundary beyond the region's edge: take the edge.
                row[0] = 1.0;
                sum = 1.0;
            }
            row.iter_mut().for_each(|w| *w /= sum);
            spans.push((first, last - first));
        }
        Self {
            spans,
            weights,
            stride,
        }
    }

    fn taps(&self, o: usize) -> (usize, &[f32]) {
        let (first, n) = self.spans[o];
        (first, &self.weights[o * self.stride..o * self.stride + n])
    }

    /// The source index range any output pixel reads.
    fn source_range(&self) -> (usize, usize) {
        let lo = self.spans.iter().map(|s| s.0).min().unwrap_or(0);
        let hi = self.spans.iter().map(|s| s.0 + s.1).max().unwrap_or(0);
        (lo, hi)
    }
}

/// Separable resampling: rows first (only the rows the vertical pass needs), then columns.
fn resample(img: &DecodedImage, ax: &AxisTaps, ay: &AxisTaps) -> Vec<f32> {
    let (out_w, out_h) = (ax.spans.len(), ay.spans.len());
    let (y_lo, y_hi) = ay.source_range();
    let mut rows = vec![0.0f32; (y_hi - y_lo) * out_w * 3];
    for (r, y) in (y_lo..y_hi).enumerate() {
        let src = &img.pixels[y * img.width * 3..(y + 1) * img.width * 3];
        let dst = &mut rows[r * out_w * 3..(r + 1) * out_w * 3];
        for (ox, px) in dst.chunks_exact_mut(3).enumerate() {
            let (first, w) = ax.taps(ox);
            let mut acc = [0.0f32; 3];
            for (t, &wt) in w.iter().enumerate() {
                let s = &src[(first + t) * 3..(first + t) * 3 + 3];
                acc[0] += wt * s[0] as f32;
                acc[1] += wt * s[1] as f32;
                acc[2] += wt * s[2] as f32;
            }
            px.copy_from_slice(&acc);
        }
    }
    let row_len = out_w * 3;
    let mut out = vec![0.0f32; out_h * row_len];
    for (oy, dst) in out.chunks_exact_mut(row_len).enumerate() {
        let (first, w) = ay.taps(oy);
        for (t, &wt) in w.iter().enumerate() {
            let src = &rows[(first + t - y_lo) * row_len..(first + t - y_lo + 1) * row_len];
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += wt * s);
        }
    }
    out
}

/// Mirrors each row of a `size` x `size` HWC image.
fn flip_horizontal(img: &mut [f32], size: usize) {
    for row in img.chunks_exact_mut(size * 3) {
        for x in 0..size / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (size - 1 - x) * 3 + c);
            }
        }
    }
}

fn grey(px: &[f32]) -> f32 {
    0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2]
}

/// torchvision's `ColorJitter(s, s, s)` with drawn factors: brightness, contrast and saturation
/// applied in the drawn order, values clamped to 0..=255 after each.
fn colour_jitter(img: &mut [f32], ops: &[(u8, f32); 3]) {
    for &(op, f) in ops {
        match op {
            0 => blend(img, f, |_| [0.0; 3]),
            1 => {
                let mean = img.chunks_exact(3).map(grey).sum::<f32>() / (img.len() / 3) as f32;
                blend(img, f, |_| [mean; 3])
            }
            _ => blend(img, f, |px| [grey(px); 3]),
        }
    }
}

/// Every pixel becomes `f * pixel + (1 - f) * other(pixel)`, clamped to 0..=255.
fn blend(img: &mut [f32], f: f32, other: impl Fn(&[f32]) -> [f32; 3]) {
    for px in img.chunks_exact_mut(3) {
        let o = other(px);
        for c in 0..3 {
            px[c] = (f * px[c] + (1.0 - f) * o[c]).clamp(0.0, 255.0);
        }
    }
}

/// 0..=255 values -> (x / 255 - mean) / std per channel.
pub fn normalize(img: &mut [f32], norm: &Normalization) {
    for px in img.chunks_exact_mut(3) {
        for ((v, m), s) in px.iter_mut().zip(norm.mean).zip(norm.std) {
            *v = (*v / 255.0 - m) / s;
        }
    }
}
