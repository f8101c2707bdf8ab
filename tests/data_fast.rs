//! The loader's u8 path against the f32 reference transforms, on real photographs: the same draws
//! give the same image to within u8 rounding; decoders (zune-jpeg, libjpeg-turbo, DCT-scaled
//! decoding) agree; normalisation at packing time; `pack --max-side`.
//!
//! Fixtures `astronaut_*.jpg`: scikit-image's `astronaut` photograph (NASA, public domain),
//! re-encoded with Pillow at quality 90 (baseline 500x375, and progressive 512x512).

#[path = "data_helpers.rs"]
mod helpers;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use helpers::*;
use inception_engine::data::transform::{
    draw_train, eval_resize, eval_transform_crop, eval_u8_into, normalize_u8_into, train_transform,
    train_u8_into, Scratch,
};
use inception_engine::data::{
    decode_image, packed, AugmentConfig, Dataset, DecodedImage, Decoder, ImageFolder, JpegBackend,
    Normalization, MEAN, STD,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::fs;

const IMAGENET: Normalization = Normalization::IMAGENET;

fn photo(name: &str) -> DecodedImage {
    decode_image(&fs::read(fixture(name)).unwrap()).unwrap()
}

fn photos() -> Vec<DecodedImage> {
    vec![
        photo("astronaut_500x375_baseline.jpg"),
        photo("astronaut_512_progressive.jpg"),
    ]
}

/// Normalised f32 back to 0..=255.
fn denormalise(v: &[f32]) -> Vec<f32> {
    v.iter()
        .enumerate()
        .map(|(i, x)| (x * STD[i % 3] + MEAN[i % 3]) * 255.0)
        .collect()
}

/// (largest, mean) absolute difference in 0..=255 units.
fn diff(reference: &[f32], ours: &[u8]) -> (f32, f32) {
    assert_eq!(reference.len(), ours.len());
    let d: Vec<f32> = reference
        .iter()
        .zip(ours)
        .map(|(a, &b)| (a - b as f32).abs())
        .collect();
    let max = d.iter().cloned().fold(0.0, f32::max);
    (max, d.iter().sum::<f32>() / d.len() as f32)
}

#[test]
fn u8_training_transform_matches_the_f32_reference_for_the_same_draws() {
    let mut scratch = Scratch::default();
    let configs = [
        AugmentConfig::default(),
        AugmentConfig {
            jitter: 0.0,
            ..AugmentConfig::default()
        },
        AugmentConfig {
            scale: (0.5, 1.0),
            flip_prob: 1.0,
            ..AugmentConfig::default()
        },
    ];
    // (max, mean) without and with jitter.
    let mut worst = [(0.0f32, 0.0f32); 2];
    for img in photos() {
        for cfg in &configs {
            for size in [299, 75, 32] {
                for seed in 0..12u64 {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    let reference = train_transform(&img, size, cfg, &IMAGENET, &mut rng);
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    let draws = draw_train(img.width, img.height, cfg, &mut rng);
                    let mut out = vec![0u8; size * size * 3];
                    let full = (img.width, img.height);
                    train_u8_into(&img, full, &draws, size, &mut out, &mut scratch).unwrap();
                    let (max, mean) = diff(&denormalise(&reference), &out);
                    // The one u8 rounding (at the end, after the jitter: the resize of a
                    // jittered image is kept at 16 bits) and the resize's fixed-point filter
                    // stay within 2 levels whatever the jitter factors; the mean within half
                    // a level.
                    assert!(
                        max <= 2.0 + 1e-3 && mean < 0.5,
                        "seed {seed} size {size} {cfg:?} {draws:?}: max {max}, mean {mean}"
                    );
                    let k = usize::from(draws.jitter.is_some());
                    worst[k] = (worst[k].0.max(max), worst[k].1.max(mean));
                }
            }
        }
    }
    eprintln!(
        "u8 vs f32 training transform, worst (max, mean) in 0..255 units: without jitter {:.3?}, with jitter {:.3?}",
        worst[0], worst[1]
    );
}

#[test]
fn draws_are_the_reference_transforms_draws() {
    // train_transform draws through draw_train: the rng is left in the same state either way.
    let img = photo("astronaut_500x375_baseline.jpg");
    let cfg = AugmentConfig::default();
    let mut a = ChaCha8Rng::seed_from_u64(5);
    let mut b = ChaCha8Rng::seed_from_u64(5);
    train_transform(&img, 32, &cfg, &IMAGENET, &mut a);
    let d = draw_train(img.width, img.height, &cfg, &mut b);
    assert_eq!(
        rand::Rng::random::<u64>(&mut a),
        rand::Rng::random::<u64>(&mut b)
    );
    let ops = d.jitter.unwrap();
    let mut kinds: Vec<u8> = ops.iter().map(|o| o.0).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, [0, 1, 2]);
    assert!(ops.iter().all(|o| (0.6..=1.4).contains(&o.1)));
}

#[test]
fn u8_evaluation_transform_matches_the_f32_reference() {
    let mut scratch = Scratch::default();
    for img in photos() {
        for (size, crop_pct) in [(299, 1.0), (224, 0.875), (75, 1.0), (64, 0.9)] {
            let reference = eval_transform_crop(&img, size, crop_pct, &IMAGENET);
            let mut out = vec![0u8; size * size * 3];
            let full = (img.width, img.height);
            let resize = eval_resize(size, crop_pct);
            eval_u8_into(&img, full, resize, size, &mut out, &mut scratch).unwrap();
            let (max, mean) = diff(&denormalise(&reference), &out);
            assert!(
                max <= 2.0 + 1e-3 && mean < 0.5,
                "{size} {crop_pct}: {max} {mean}"
            );
        }
    }
}

#[test]
fn packing_normalises_like_the_reference() {
    let src: Vec<u8> = (0..=255u8).cycle().take(3 * 1001).collect();
    let mut ours = vec![0.0f32; src.len()];
    normalize_u8_into(&src, &mut ours, &IMAGENET);
    for (i, (&s, &o)) in src.iter().zip(&ours).enumerate() {
        let c = i % 3;
        let expect = (s as f32 / 255.0 - MEAN[c]) / STD[c];
        assert!((o - expect).abs() < 1e-5, "{i}: {o} vs {expect}");
    }
}

/// libjpeg-turbo, a tool group: tools/test.sh installs libturbojpeg0; a bare `cargo test`
/// without it skips these checks with a note.
fn turbo() -> Option<Decoder> {
    let d = Decoder::new(JpegBackend::Turbo).map_err(|e| format!("{e:#}"));
    let probe = d.as_ref().map(|_| ()).map_err(|e| e.clone());
    tool_groups::available("libjpeg-turbo", probe).then(|| d.unwrap())
}

#[test]
fn zune_and_turbo_decode_the_same_pixels() {
    let mut zune = Decoder::new(JpegBackend::Zune).unwrap();
    assert!(!zune.uses_turbo());
    let Some(mut turbo) = turbo() else { return };
    assert!(turbo.uses_turbo());
    let empty = || DecodedImage {
        width: 0,
        height: 0,
        pixels: vec![],
    };
    for name in [
        "astronaut_500x375_baseline.jpg",
        "astronaut_512_progressive.jpg",
        "data_progressive.jpg",
        "data_progressive_grey.jpg",
    ] {
        let bytes = fs::read(fixture(name)).unwrap();
        let (mut a, mut b) = (empty(), empty());
        assert_eq!(zune.decode_into(&bytes, 1, &mut a).unwrap(), 1);
        assert_eq!(turbo.decode_into(&bytes, 1, &mut b).unwrap(), 1);
        let reference = decode_image(&bytes).unwrap();
        assert_eq!(a, reference, "{name}: zune path differs from decode_image");
        assert_eq!((a.width, a.height), (b.width, b.height));
        let h = turbo.header(&bytes).unwrap();
        assert_eq!((h.width, h.height, h.jpeg), (a.width, a.height, true));
        let d: Vec<f32> = a
            .pixels
            .iter()
            .zip(&b.pixels)
            .map(|(&x, &y)| (x as f32 - y as f32).abs())
            .collect();
        let mean = d.iter().sum::<f32>() / d.len() as f32;
        let max = d.iter().cloned().fold(0.0, f32::max);
        // Both use an accurate integer IDCT and smooth chroma upsampling; they differ by rounding.
        assert!(mean < 1.0 && max <= 12.0, "{name}: mean {mean} max {max}");
    }
}

#[test]
fn scaled_decoding_gives_the_same_crop() {
    let Some(mut turbo) = turbo() else { return };
    // A 1024x768 photograph, so that large crops are at least twice a 299 output.
    let base = photo("astronaut_500x375_baseline.jpg");
    let big = image::imageops::resize(
        &image::RgbImage::from_raw(base.width as u32, base.height as u32, base.pixels).unwrap(),
        1024,
        768,
        image::imageops::FilterType::Triangle,
    );
    let mut bytes = Vec::new();
    big.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
        &mut bytes, 90,
    ))
    .unwrap();
    let mut full = DecodedImage {
        width: 0,
        height: 0,
        pixels: vec![],
    };
    turbo.decode_into(&bytes, 1, &mut full).unwrap();
    let mut scratch = Scratch::default();
    let cfg = AugmentConfig {
        scale: (0.6, 1.0),
        ..AugmentConfig::default()
    };
    let size = 256;
    for denom in [2usize, 4] {
        let mut scaled = DecodedImage {
            width: 0,
            height: 0,
            pixels: vec![],
        };
        assert_eq!(
            turbo.decode_into(&bytes, denom, &mut scaled).unwrap(),
            denom
        );
        assert_eq!(
            (scaled.width, scaled.height),
            (1024usize.div_ceil(denom), 768usize.div_ceil(denom))
        );
        let mut means = vec![];
        for seed in 0..8u64 {
            let draws = draw_train(1024, 768, &cfg, &mut ChaCha8Rng::seed_from_u64(seed));
            let mut a = vec![0u8; size * size * 3];
            let mut b = vec![0u8; size * size * 3];
            train_u8_into(&full, (1024, 768), &draws, size, &mut a, &mut scratch).unwrap();
            train_u8_into(&scaled, (1024, 768), &draws, size, &mut b, &mut scratch).unwrap();
            let af: Vec<f32> = a.iter().map(|&v| v as f32).collect();
            let (_, mean) = diff(&af, &b);
            means.push(mean);
        }
        let mean = means.iter().sum::<f32>() / means.len() as f32;
        eprintln!("1/{denom} scaled decode vs full: mean abs diff {mean:.2} / 255");
        // The same picture: a DCT-domain downscale differs from a full decode plus resize by a
        // little blur and ringing only (a shift of the crop by one pixel costs several levels).
        assert!(mean < 4.0, "1/{denom}: mean abs diff {mean}");
    }
}

#[test]
fn pack_max_side_resizes_large_images_only_and_records_n() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("set");
    fs::create_dir_all(root.join("a")).unwrap();
    fs::create_dir_all(root.join("b")).unwrap();
    let big = fs::read(fixture("astronaut_500x375_baseline.jpg")).unwrap();
    fs::write(root.join("a/big.jpg"), &big).unwrap();
    let small = fs::read(fixture("data_progressive.jpg")).unwrap();
    fs::write(root.join("a/small.jpg"), &small).unwrap();
    save_png(&rgb_image(600, 400, 3), &root.join("b/wide.png"));
    fs::write(root.join("b/broken.jpg"), b"not an image").unwrap();
    let folder = ImageFolder::open(&root).unwrap();

    let plain = dir.path().join("plain.pack");
    packed::write_packed(&folder, &plain).unwrap();
    let Dataset::Packed(p) = Dataset::open(&plain).unwrap() else {
        panic!("not a pack")
    };
    assert_eq!(p.max_side(), None);
    assert_eq!(
        fs::read(&plain).unwrap()[8],
        1,
        "version 1 without --max-side"
    );

    let out = dir.path().join("max.pack");
    let opts = packed::PackOptions {
        max_side: Some(320),
        quality: 90,
    };
    let s = packed::write_packed_with(&folder, &out, opts).unwrap();
    assert_eq!((s.images, s.resized), (4, 2));
    let ds = Dataset::open(&out).unwrap();
    let Dataset::Packed(p) = &ds else {
        panic!("not a pack")
    };
    assert_eq!(p.max_side(), Some(320));
    // Order: a/big.jpg, a/small.jpg, b/broken.jpg, b/wide.png.
    let big_img = ds.read(0).unwrap();
    assert_eq!((big_img.width, big_img.height), (427, 320));
    assert_eq!(
        p.bytes(1),
        &small[..],
        "small images are stored as they were"
    );
    assert!(
        ds.read(2).is_err(),
        "a broken file stays broken (skipped by the loader)"
    );
    let wide = ds.read(3).unwrap();
    assert_eq!((wide.width, wide.height), (480, 320));
    assert_eq!(
        image::guess_format(p.bytes(3)).unwrap(),
        image::ImageFormat::Png
    );
    // The picture survives: the resized photo against the original resized the same way.
    let reference = photo("astronaut_500x375_baseline.jpg");
    let mut scratch = Scratch::default();
    let mut a = vec![0u8; 64 * 64 * 3];
    let mut b = vec![0u8; 64 * 64 * 3];
    eval_u8_into(&reference, (500, 375), 64, 64, &mut a, &mut scratch).unwrap();
    eval_u8_into(&big_img, (427, 320), 64, 64, &mut b, &mut scratch).unwrap();
    let af: Vec<f32> = a.iter().map(|&v| v as f32).collect();
    let (_, mean) = diff(&af, &b);
    assert!(mean < 3.0, "mean abs diff {mean}");
    assert!(packed::write_packed_with(
        &folder,
        &out,
        packed::PackOptions {
            max_side: Some(0),
            quality: 90
        }
    )
    .is_err());
}
