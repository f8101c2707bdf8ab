//! ImageFolder scanning, labels, decoding of every supported kind of file, and open errors.

#[path = "data_helpers.rs"]
mod helpers;

use helpers::*;
use image::codecs::jpeg::JpegEncoder;
use image::ImageFormat;
use inception_engine::data::{bundled_dataset, decode_image, Dataset};
use std::fs;

fn open_err(path: &std::path::Path) -> String {
    format!("{:#}", Dataset::open(path).unwrap_err())
}

#[test]
fn labels_follow_sorted_class_folders() {
    let dir = tempfile::tempdir().unwrap();
    // Created out of order; labels must follow the sorted names, not creation order.
    make_folder(dir.path(), &["zebra", "ant", "Moose", "bee"], 2);
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.classes(), ["Moose", "ant", "bee", "zebra"]);
    assert_eq!(ds.len(), 8);
    let labels: Vec<u32> = (0..ds.len()).map(|i| ds.label(i)).collect();
    assert_eq!(labels, [0, 0, 1, 1, 2, 2, 3, 3]);
    assert!(ds.describe(0).contains("Moose"));
    assert!(ds.describe(7).contains("zebra"));
}

#[test]
fn hidden_files_unknown_extensions_and_nested_folders() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &["a", "b"], 1);
    fs::write(dir.path().join("a/notes.txt"), "not an image").unwrap();
    fs::write(dir.path().join("a/.hidden.png"), "hidden").unwrap();
    fs::write(dir.path().join("README.md"), "top-level file, not a class").unwrap();
    fs::create_dir_all(dir.path().join(".cache/x")).unwrap();
    save_png(&rgb_image(5, 5, 1), &dir.path().join(".cache/x/skip.png"));
    save_png(&rgb_image(5, 5, 2), &dir.path().join("b/sub/deep.PNG"));
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.classes(), ["a", "b"]);
    assert_eq!(
        ds.len(),
        3,
        "one in a, two in b (one nested, upper-case extension)"
    );
    assert_eq!(ds.label(2), 1);
}

#[test]
fn empty_class_folder_keeps_its_label() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &["a", "c"], 1);
    fs::create_dir(dir.path().join("b")).unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.classes(), ["a", "b", "c"]);
    assert_eq!((ds.label(0), ds.label(1)), (0, 2));
}

#[test]
fn decodes_png_rgb_grey_and_alpha() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.png");

    let rgb = rgb_image(9, 7, 3);
    rgb.save_with_format(&p, ImageFormat::Png).unwrap();
    let d = decode_image(&fs::read(&p).unwrap()).unwrap();
    assert_eq!((d.width, d.height), (9, 7));
    assert_eq!(d.pixels, rgb.into_raw());

    let grey = grey_image(6, 4, 9);
    grey.save_with_format(&p, ImageFormat::Png).unwrap();
    let d = decode_image(&fs::read(&p).unwrap()).unwrap();
    assert_eq!(d.pixels.len(), 6 * 4 * 3);
    let v = grey.get_pixel(5, 3).0[0];
    assert_eq!(
        d.pixel(5, 3),
        [v, v, v],
        "grey becomes three equal channels"
    );

    rgba_image(5, 5)
        .save_with_format(&p, ImageFormat::Png)
        .unwrap();
    let d = decode_image(&fs::read(&p).unwrap()).unwrap();
    assert_eq!(d.pixel(3, 4), [3, 4, 200], "alpha is dropped, colour kept");

    grey_alpha_image(5, 5)
        .save_with_format(&p, ImageFormat::Png)
        .unwrap();
    let d = decode_image(&fs::read(&p).unwrap()).unwrap();
    assert_eq!(d.pixel(2, 1), [3, 3, 3]);
}

#[test]
fn decodes_baseline_jpeg_rgb_and_grey() {
    let rgb = rgb_image(40, 24, 0);
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 95)
        .encode_image(&rgb)
        .unwrap();
    let d = decode_image(&bytes).unwrap();
    assert_eq!((d.width, d.height), (40, 24));
    let mean_err = mean_abs_diff(&d.pixels, rgb.as_raw());
    assert!(mean_err < 8.0, "lossy but close: mean error {mean_err}");

    let grey = grey_image(16, 16, 0);
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 95)
        .encode_image(&grey)
        .unwrap();
    let d = decode_image(&bytes).unwrap();
    assert_eq!(d.pixels.len(), 16 * 16 * 3);
    assert!(d.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// The fixtures were made with libjpeg-turbo's `cjpeg -progressive` from a 48x32 gradient:
/// red = x * 255 / 47, green = y * 255 / 31, blue = 128 (`image` cannot write progressive JPEG).
#[test]
fn decodes_progressive_jpeg() {
    let bytes = fs::read(fixture("data_progressive.jpg")).unwrap();
    assert!(
        bytes.windows(2).any(|w| w == [0xFF, 0xC2]),
        "fixture must be progressive (SOF2)"
    );
    let d = decode_image(&bytes).unwrap();
    assert_eq!((d.width, d.height), (48, 32));
    let expected: Vec<u8> = (0..32)
        .flat_map(|y| (0..48).flat_map(move |x| [(x * 255 / 47) as u8, (y * 255 / 31) as u8, 128]))
        .collect();
    let err = mean_abs_diff(&d.pixels, &expected);
    assert!(err < 4.0, "mean error {err}");

    let d = decode_image(&fs::read(fixture("data_progressive_grey.jpg")).unwrap()).unwrap();
    assert_eq!((d.width, d.height), (48, 32));
    assert!(d.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
}

#[test]
fn format_comes_from_content_not_extension() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c/really_a_png.jpg");
    save_png(&rgb_image(4, 4, 0), &p);
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.read(0).unwrap().width, 4);
}

#[test]
fn non_image_bytes_are_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("c")).unwrap();
    fs::write(dir.path().join("c/bad.jpg"), "hello").unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    let err = format!("{:#}", ds.read(0).unwrap_err());
    assert!(err.contains("bad.jpg"), "{err}");
}

#[test]
fn clear_errors_for_missing_and_empty_folders() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let e = open_err(&missing);
    assert!(e.contains("does not exist") && e.contains("nope"), "{e}");

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let e = open_err(&empty);
    assert!(e.contains("is empty") && e.contains("empty"), "{e}");

    let flat = dir.path().join("flat");
    save_png(&rgb_image(4, 4, 0), &flat.join("a.png"));
    let e = open_err(&flat);
    assert!(
        e.contains("no class subfolders") && e.contains("flat"),
        "{e}"
    );

    let no_images = dir.path().join("noimg");
    fs::create_dir_all(no_images.join("a")).unwrap();
    fs::write(no_images.join("a/x.txt"), "text").unwrap();
    let e = open_err(&no_images);
    assert!(e.contains("no images") && e.contains("noimg"), "{e}");

    let not_pack = dir.path().join("file.bin");
    fs::write(&not_pack, "just some bytes").unwrap();
    let e = open_err(&not_pack);
    assert!(
        e.contains("neither a folder nor a packed dataset") && e.contains("file.bin"),
        "{e}"
    );
}

#[test]
fn bundled_fashion_mnist_mini() {
    let names = [
        "0-tshirt_top",
        "1-trouser",
        "2-pullover",
        "3-dress",
        "4-coat",
        "5-sandal",
        "6-shirt",
        "7-sneaker",
        "8-bag",
        "9-ankle_boot",
    ];
    for (split, per_class) in [("train", 50), ("val", 20)] {
        let ds = Dataset::open(&bundled_dataset().unwrap().join(split)).unwrap();
        assert_eq!(ds.classes(), names);
        assert_eq!(ds.len(), 10 * per_class);
        for i in 0..ds.len() {
            assert_eq!(ds.label(i) as usize, i / per_class);
            let img = ds.read(i).unwrap();
            assert_eq!((img.width, img.height), (28, 28));
        }
    }
}
