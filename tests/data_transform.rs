//! Transforms: shapes, value ranges, geometry of crops and resizes, determinism, speed.

#[path = "data_helpers.rs"]
mod helpers;

use helpers::*;
use inception_engine::data::transform::{
    check_crop_pct, eval_resize, eval_transform, eval_transform_crop, random_resized_crop_box,
    resize_crop, resize_shorter_and_centre_crop, resize_shorter_then_centre_crop, train_transform,
    CropBox,
};
use inception_engine::data::{AugmentConfig, DecodedImage, Normalization, MEAN, STD};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const IMAGENET: Normalization = Normalization::IMAGENET;

fn decoded(img: image::ImageBuffer<image::Rgb<u8>, Vec<u8>>) -> DecodedImage {
    DecodedImage {
        width: img.width() as usize,
        height: img.height() as usize,
        pixels: img.into_raw(),
    }
}

fn constant(w: usize, h: usize, rgb: [u8; 3]) -> DecodedImage {
    DecodedImage {
        width: w,
        height: h,
        pixels: rgb.repeat(w * h),
    }
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Normalised values of 0 and 255 per channel: every output must lie between them.
fn in_normalised_range(v: &[f32]) -> bool {
    v.chunks(3).all(|px| {
        (0..3).all(|c| {
            let lo = (0.0 - MEAN[c]) / STD[c] - 1e-4;
            let hi = (1.0 - MEAN[c]) / STD[c] + 1e-4;
            (lo..=hi).contains(&px[c])
        })
    })
}

#[test]
fn shapes_and_ranges_at_many_sizes() {
    let imgs = [
        decoded(rgb_image(50, 37, 5)),
        decoded(rgb_image(1, 1, 9)),
        decoded(rgb_image(3, 200, 1)),
    ];
    let cfg = AugmentConfig::default();
    for img in &imgs {
        for size in [1, 2, 7, 75, 299] {
            let t = train_transform(img, size, &cfg, &IMAGENET, &mut rng(size as u64));
            assert_eq!(t.len(), size * size * 3);
            assert!(in_normalised_range(&t), "train out of range at {size}");
            let e = eval_transform(img, size, &IMAGENET);
            assert_eq!(e.len(), size * size * 3);
            assert!(in_normalised_range(&e), "eval out of range at {size}");
            assert!(t.iter().chain(&e).all(|v| v.is_finite()));
        }
    }
}

#[test]
fn constant_image_stays_constant_and_normalises_exactly() {
    let img = constant(40, 30, [255, 0, 128]);
    let expect = [
        (1.0 - MEAN[0]) / STD[0],
        (0.0 - MEAN[1]) / STD[1],
        (128.0 / 255.0 - MEAN[2]) / STD[2],
    ];
    for size in [1, 13, 64] {
        for px in eval_transform(&img, size, &IMAGENET).chunks(3) {
            for c in 0..3 {
                assert!((px[c] - expect[c]).abs() < 1e-4, "{px:?}");
            }
        }
    }
}

#[test]
fn eval_of_a_square_image_at_its_own_size_is_exact() {
    let img = decoded(rgb_image(20, 20, 3));
    let out = resize_shorter_and_centre_crop(&img, 20);
    let expect: Vec<f32> = img.pixels.iter().map(|&p| p as f32).collect();
    assert_eq!(out.len(), expect.len());
    assert!(out.iter().zip(&expect).all(|(a, b)| (a - b).abs() < 1e-3));
}

#[test]
fn eval_centre_crops_the_longer_side() {
    // A 30x10 image: left third red, middle green, right third blue. Resized to 3 rows, it is
    // 9 wide; the centre 3x3 crop must be the green middle.
    let mut img = constant(30, 10, [0, 0, 0]);
    for y in 0..10 {
        for x in 0..30 {
            let c = x / 10;
            img.pixels[(y * 30 + x) * 3 + c] = 255;
        }
    }
    let out = resize_shorter_and_centre_crop(&img, 3);
    for px in out.chunks(3) {
        assert!(px[1] > 200.0 && px[0] < 60.0 && px[2] < 60.0, "{px:?}");
    }
    // A tall image likewise keeps its middle band.
    let mut tall = constant(10, 30, [0, 0, 0]);
    for y in 0..30 {
        for x in 0..10 {
            tall.pixels[(y * 10 + x) * 3 + y / 10] = 255;
        }
    }
    let out = resize_shorter_and_centre_crop(&tall, 3);
    assert!(out.chunks(3).all(|px| px[1] > 200.0), "{out:?}");
}

/// A 200x100 image whose red channel is the column and green channel the row: resampling a
/// linear ramp gives back the source coordinate each output pixel is centred on, so the output
/// shows the resize-then-crop geometry directly.
fn ramp() -> DecodedImage {
    let (w, h) = (200, 100);
    let mut pixels = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            pixels.extend([x as u8, y as u8, 0]);
        }
    }
    DecodedImage {
        width: w,
        height: h,
        pixels,
    }
}

/// Where output pixel `o` of an axis of source length `len` samples the source (in pixel
/// values of the ramp), when the shorter side `short` is resized to `resize` and the centre
/// `size` pixels are cut out (torchvision's Resize + CenterCrop, rounding half to even).
fn expected_coordinate(len: usize, short: usize, resize: usize, size: usize, o: usize) -> f64 {
    let rlen = if len == short {
        resize
    } else {
        resize * len / short
    };
    let offset = ((rlen - size) as f64 / 2.0).round_ties_even();
    (offset + o as f64 + 0.5) * len as f64 / rlen as f64 - 0.5
}

#[test]
fn crop_pct_resizes_the_shorter_side_to_size_over_crop_pct_then_centre_crops() {
    assert_eq!(eval_resize(96, 0.875), 109);
    assert_eq!(eval_resize(224, 0.875), 256);
    assert_eq!(eval_resize(299, 1.0), 299);
    assert_eq!(eval_resize(32, 0.5), 64);
    assert!(check_crop_pct(0.0).is_err() && check_crop_pct(1.5).is_err());
    assert!(check_crop_pct(1.0).is_ok() && check_crop_pct(0.875).is_ok());
    let img = ramp();
    let size = 32;
    // 1.0: the shorter side (100) to 32, the longer to 64; 0.5: to 64 and 128, then the centre
    // 32x32; 0.86: to 37 and 74, an odd margin (5 rows) whose half rounds to even (2).
    for (crop_pct, resize) in [(1.0, 32), (0.5, 64), (0.86, 37)] {
        assert_eq!(eval_resize(size, crop_pct), resize);
        let out = eval_transform_crop(
            &img,
            size,
            crop_pct,
            &Normalization {
                mean: [0.0; 3],
                std: [1.0 / 255.0; 3],
            },
        );
        let raw = resize_shorter_then_centre_crop(&img, resize, size);
        assert!(out.iter().zip(&raw).all(|(a, b)| (a - b).abs() < 1e-3));
        for o in 1..size - 1 {
            // Red along the middle row, green down the middle column; the outermost pixels are
            // left out, where the filter meets the image border at crop_pct 1. The tolerance
            // covers the sampled triangle filter's centroid error; a crop off by one resized
            // pixel would be off by 100 / resize >= 1.5 here.
            let red = out[((size / 2) * size + o) * 3] as f64;
            let green = out[(o * size + size / 2) * 3 + 1] as f64;
            let (ex, ey) = (
                expected_coordinate(200, 100, resize, size, o),
                expected_coordinate(100, 100, resize, size, o),
            );
            assert!(
                (red - ex).abs() < 0.15,
                "crop_pct {crop_pct} column {o}: {red} vs {ex}"
            );
            assert!(
                (green - ey).abs() < 0.15,
                "crop_pct {crop_pct} row {o}: {green} vs {ey}"
            );
        }
    }
    // At 1 it is the plain evaluation transform.
    let n = Normalization::IMAGENET;
    assert_eq!(
        eval_transform_crop(&img, 24, 1.0, &n),
        eval_transform(&img, 24, &n)
    );
    assert_ne!(
        eval_transform_crop(&img, 24, 0.875, &n),
        eval_transform(&img, 24, &n)
    );
}

#[test]
fn resize_crop_reads_only_the_crop() {
    // Left half black, right half white; a crop of the right half must be all white even when
    // upscaled (no bleeding from outside the crop).
    let mut img = constant(20, 10, [0, 0, 0]);
    for y in 0..10 {
        for x in 10..20 {
            img.pixels[(y * 20 + x) * 3..(y * 20 + x) * 3 + 3].copy_from_slice(&[255; 3]);
        }
    }
    let crop = CropBox {
        x: 10,
        y: 0,
        width: 10,
        height: 10,
    };
    for size in [3, 10, 37] {
        assert!(resize_crop(&img, crop, size)
            .iter()
            .all(|&v| (v - 255.0).abs() < 1e-3));
    }
}

#[test]
fn upscaling_interpolates_bilinearly() {
    // Two pixels 0 and 255 side by side, upscaled to 4: half-pixel centres give
    // 0, 63.75, 191.25, 255.
    let img = DecodedImage {
        width: 2,
        height: 1,
        pixels: vec![0, 0, 0, 255, 255, 255],
    };
    let out = resize_crop(
        &img,
        CropBox {
            x: 0,
            y: 0,
            width: 2,
            height: 1,
        },
        4,
    );
    let row: Vec<f32> = out[..12].chunks(3).map(|p| p[0]).collect();
    let expect = [0.0, 63.75, 191.25, 255.0];
    assert!(
        row.iter().zip(expect).all(|(a, b)| (a - b).abs() < 1e-3),
        "{row:?}"
    );
}

#[test]
fn downscaling_averages_instead_of_aliasing() {
    // A 1-pixel checkerboard shrunk 4x must come out mid-grey everywhere, not black or white.
    let mut img = constant(64, 64, [0, 0, 0]);
    for i in 0..64 * 64 {
        if (i % 64 + i / 64) % 2 == 0 {
            img.pixels[i * 3..i * 3 + 3].copy_from_slice(&[255; 3]);
        }
    }
    let out = resize_crop(
        &img,
        CropBox {
            x: 0,
            y: 0,
            width: 64,
            height: 64,
        },
        16,
    );
    assert!(
        out.iter().all(|&v| (v - 127.5).abs() < 20.0),
        "min {:?}",
        out.iter().cloned().fold(f32::MAX, f32::min)
    );
}

#[test]
fn crop_boxes_respect_scale_and_ratio() {
    let mut r = rng(1);
    let (w, h) = (400, 300);
    for _ in 0..2000 {
        let b = random_resized_crop_box(w, h, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut r);
        assert!(
            b.width >= 1 && b.height >= 1 && b.x + b.width <= w && b.y + b.height <= h,
            "{b:?}"
        );
        let area = (b.width * b.height) as f64 / (w * h) as f64;
        let ratio = b.width as f64 / b.height as f64;
        // Rounding to whole pixels moves area and ratio slightly past the bounds.
        assert!((0.07..=1.01).contains(&area), "area {area}");
        assert!((0.7..=1.4).contains(&ratio), "ratio {ratio}");
    }
}

#[test]
fn crop_falls_back_to_a_centre_crop() {
    // A 1000x10 strip can never hold a crop with ratio <= 4/3 and area >= 8%: after ten tries
    // the fallback is a centred crop of the full height at the largest allowed ratio.
    let b = random_resized_crop_box(1000, 10, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng(3));
    assert_eq!(
        b,
        CropBox {
            x: 493,
            y: 0,
            width: 13,
            height: 10
        }
    );
    // Scale (1, 1) with the image's own ratio is always the whole image.
    let b = random_resized_crop_box(30, 30, (1.0, 1.0), (1.0, 1.0), &mut rng(3));
    assert_eq!(
        b,
        CropBox {
            x: 0,
            y: 0,
            width: 30,
            height: 30
        }
    );
}

#[test]
fn train_without_randomness_equals_eval() {
    let img = decoded(rgb_image(32, 32, 4));
    let cfg = AugmentConfig {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        flip_prob: 0.0,
        jitter: 0.0,
    };
    assert_eq!(
        train_transform(&img, 24, &cfg, &IMAGENET, &mut rng(0)),
        eval_transform(&img, 24, &IMAGENET)
    );
}

#[test]
fn flip_mirrors_rows() {
    let img = decoded(rgb_image(32, 32, 4));
    let plain = AugmentConfig {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        flip_prob: 0.0,
        jitter: 0.0,
    };
    let flip = AugmentConfig {
        flip_prob: 1.0,
        ..plain.clone()
    };
    let a = train_transform(&img, 16, &plain, &IMAGENET, &mut rng(0));
    let b = train_transform(&img, 16, &flip, &IMAGENET, &mut rng(0));
    assert_ne!(a, b);
    for y in 0..16 {
        for x in 0..16 {
            let (i, j) = ((y * 16 + x) * 3, (y * 16 + 15 - x) * 3);
            assert_eq!(a[i..i + 3], b[j..j + 3]);
        }
    }
}

#[test]
fn jitter_changes_colours_within_range() {
    let img = decoded(rgb_image(32, 32, 4));
    let plain = AugmentConfig {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        flip_prob: 0.0,
        jitter: 0.0,
    };
    let jitter = AugmentConfig {
        jitter: 0.4,
        ..plain.clone()
    };
    let a = train_transform(&img, 16, &plain, &IMAGENET, &mut rng(5));
    let b = train_transform(&img, 16, &jitter, &IMAGENET, &mut rng(5));
    assert_ne!(a, b);
    assert!(in_normalised_range(&b));
}

#[test]
fn same_seed_same_output_different_seed_different_output() {
    let img = decoded(rgb_image(60, 45, 2));
    let cfg = AugmentConfig::default();
    let a = train_transform(&img, 32, &cfg, &IMAGENET, &mut rng(11));
    assert_eq!(a, train_transform(&img, 32, &cfg, &IMAGENET, &mut rng(11)));
    assert_ne!(a, train_transform(&img, 32, &cfg, &IMAGENET, &mut rng(12)));
}

#[test]
fn invalid_augment_settings_are_rejected() {
    let bad = [
        AugmentConfig {
            scale: (0.0, 1.0),
            ..Default::default()
        },
        AugmentConfig {
            scale: (0.9, 0.5),
            ..Default::default()
        },
        AugmentConfig {
            ratio: (1.5, 1.0),
            ..Default::default()
        },
        AugmentConfig {
            flip_prob: 1.5,
            ..Default::default()
        },
        AugmentConfig {
            jitter: -0.1,
            ..Default::default()
        },
    ];
    for cfg in bad {
        assert!(cfg.validate().is_err(), "{cfg:?}");
    }
    assert!(AugmentConfig::default().validate().is_ok());
}

#[test]
fn jpeg_500px_to_299_is_fast() {
    let img = rgb_image(500, 375, 7);
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(&img)
        .unwrap();
    let decoded = inception_engine::data::decode_image(&bytes).unwrap();
    let cfg = AugmentConfig::default();
    let reps = 20;
    let t = std::time::Instant::now();
    for i in 0..reps {
        std::hint::black_box(eval_transform(&decoded, 299, &IMAGENET));
        std::hint::black_box(train_transform(&decoded, 299, &cfg, &IMAGENET, &mut rng(i)));
    }
    let per = t.elapsed().as_secs_f64() * 1e3 / (2 * reps) as f64;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        std::hint::black_box(inception_engine::data::decode_image(&bytes).unwrap());
    }
    let decode = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    eprintln!("500x375 JPEG: decode {decode:.2} ms, transform to 299 {per:.2} ms");
    // Generous bound so a loaded CI machine passes; typical is a few ms.
    assert!(per < 50.0, "transform took {per} ms");
}
