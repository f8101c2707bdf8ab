//! Helpers shared by the `data_*` tests (included with `#[path]`; holds no tests itself).
#![allow(dead_code)]

use image::{ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use std::path::{Path, PathBuf};

/// A deterministic colourful RGB image whose pixels depend on (x, y, tag).
pub fn rgb_image(w: u32, h: u32, tag: u8) -> ImageBuffer<Rgb<u8>, Vec<u8>> {
    ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(1)) as u8 ^ tag,
            (y * 255 / h.max(1)) as u8,
            tag.wrapping_mul(37).wrapping_add((x + y) as u8),
        ])
    })
}

pub fn grey_image(w: u32, h: u32, tag: u8) -> ImageBuffer<Luma<u8>, Vec<u8>> {
    ImageBuffer::from_fn(w, h, |x, y| {
        Luma([((x * 7 + y * 3) as u8).wrapping_add(tag)])
    })
}

pub fn rgba_image(w: u32, h: u32) -> ImageBuffer<Rgba<u8>, Vec<u8>> {
    ImageBuffer::from_fn(w, h, |x, y| Rgba([x as u8, y as u8, 200, (x * 13) as u8]))
}

pub fn grey_alpha_image(w: u32, h: u32) -> ImageBuffer<LumaA<u8>, Vec<u8>> {
    ImageBuffer::from_fn(w, h, |x, y| LumaA([(x + y) as u8, 17]))
}

pub fn save_png(img: &ImageBuffer<Rgb<u8>, Vec<u8>>, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, ImageFormat::Png).unwrap();
}

/// Writes a tree of `per_class` PNG images (of varying sizes) in each class folder.
pub fn make_folder(root: &Path, classes: &[&str], per_class: usize) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (c, class) in classes.iter().enumerate() {
        for i in 0..per_class {
            let path = root.join(class).join(format!("img{i:03}.png"));
            let tag = (c * 31 + i) as u8;
            save_png(
                &rgb_image(12 + (i as u32 % 5) * 3, 10 + (c as u32 % 3) * 4, tag),
                &path,
            );
            files.push(path);
        }
    }
    files
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn bundled(split: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/fashion-mnist-mini")
        .join(split)
}
