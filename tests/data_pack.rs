//! Packed files: round trip against the folder, loader equivalence, corrupt files, the command.

#[path = "data_helpers.rs"]
mod helpers;

use helpers::*;
use inception_engine::cli::pack;
use inception_engine::data::{packed, Batch, Dataset, ImageFolder, Loader, LoaderConfig};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A folder mixing PNG, grey PNG, baseline and progressive JPEG, and the pack made from it.
fn folder_and_pack() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    make_folder(&root, &["cat", "dog", "eel"], 4);
    grey_image(9, 11, 3)
        .save(root.join("dog/grey.png"))
        .unwrap();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode_image(&rgb_image(21, 13, 1))
        .unwrap();
    fs::write(root.join("eel/baseline.jpg"), jpeg).unwrap();
    fs::copy(
        fixture("data_progressive.jpg"),
        root.join("cat/progressive.jpeg"),
    )
    .unwrap();
    let out = dir.path().join("images.pack");
    pack::run(pack::Args {
        dir: root.clone(),
        out: out.clone(),
        max_side: None,
        quality: 90,
    })
    .unwrap();
    (dir, root, out)
}

#[test]
fn packed_file_matches_the_folder() {
    let (_dir, root, out) = folder_and_pack();
    let folder = Dataset::open(&root).unwrap();
    let packed = Dataset::open(&out).unwrap();
    assert!(matches!(folder, Dataset::Folder(_)) && matches!(packed, Dataset::Packed(_)));
    assert_eq!(packed.classes(), folder.classes());
    assert_eq!(packed.len(), 15);
    assert_eq!(packed.len(), folder.len());
    for i in 0..folder.len() {
        assert_eq!(packed.label(i), folder.label(i), "label {i}");
        assert_eq!(
            packed.read(i).unwrap(),
            folder.read(i).unwrap(),
            "image {i}"
        );
    }
    assert!(
        !out.with_extension("pack.tmp").exists(),
        "temporary file cleaned up"
    );
}

#[test]
fn loader_gives_identical_batches_from_folder_and_pack() {
    let (_dir, root, out) = folder_and_pack();
    let run = |path: &Path, cfg: LoaderConfig| -> Vec<Batch> {
        let loader = Loader::new(Arc::new(Dataset::open(path).unwrap()), cfg).unwrap();
        loader.epoch(2).collect()
    };
    let train = LoaderConfig {
        workers: 2,
        ..LoaderConfig::train(4, 20, 5)
    };
    assert_eq!(run(&root, train.clone()), run(&out, train));
    let eval = LoaderConfig {
        workers: 2,
        ..LoaderConfig::eval(4, 20)
    };
    assert_eq!(run(&root, eval.clone()), run(&out, eval));
}

#[test]
fn packed_bad_image_is_skipped_like_in_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let files = make_folder(&root, &["a", "b"], 3);
    fs::write(&files[1], "not an image").unwrap();
    let out = dir.path().join("x.pack");
    pack::run(pack::Args {
        dir: root,
        out: out.clone(),
        max_side: None,
        quality: 90,
    })
    .unwrap();
    let ds = Arc::new(Dataset::open(&out).unwrap());
    let err = format!("{:#}", ds.read(1).unwrap_err());
    assert!(err.contains("x.pack") && err.contains("#1"), "{err}");
    let loader = Loader::new(
        ds,
        LoaderConfig {
            workers: 1,
            ..LoaderConfig::eval(2, 8)
        },
    )
    .unwrap();
    let mut epoch = loader.epoch(0);
    let n: usize = epoch.by_ref().map(|b| b.len).sum();
    assert_eq!((n, epoch.skipped()), (5, 1));
}

#[test]
fn corrupt_packed_files_are_clear_errors() {
    let (dir, _root, out) = folder_and_pack();
    let bytes = fs::read(&out).unwrap();
    let bad = dir.path().join("bad.pack");
    let open_err = |data: &[u8]| {
        fs::write(&bad, data).unwrap();
        format!("{:#}", Dataset::open(&bad).unwrap_err())
    };
    // Cut inside the data section, the index, and the header.
    for cut in [bytes.len() - 10, 100, 12] {
        let e = open_err(&bytes[..cut]);
        assert!(
            e.contains("bad.pack") && (e.contains("truncated") || e.contains("outside")),
            "cut {cut}: {e}"
        );
    }
    let mut wrong_version = bytes.clone();
    wrong_version[8] = 9;
    assert!(open_err(&wrong_version).contains("unsupported version 9"));
    let mut huge_count = bytes.clone();
    huge_count[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&huge_count).contains("runs past the end"));
    let mut bad_magic = bytes.clone();
    bad_magic[0] = b'X';
    assert!(open_err(&bad_magic).contains("neither a folder nor a packed dataset"));
}

#[test]
fn packed_label_out_of_range_is_rejected() {
    let (dir, _root, out) = folder_and_pack();
    let mut bytes = fs::read(&out).unwrap();
    // First index entry starts after the header: 24 bytes + class names, padded to 8.
    let header: usize = 24
        + ["cat", "dog", "eel"]
            .iter()
            .map(|c| 4 + c.len())
            .sum::<usize>();
    let first_entry = header.next_multiple_of(8);
    bytes[first_entry..first_entry + 4].copy_from_slice(&7u32.to_le_bytes());
    let bad = dir.path().join("label.pack");
    fs::write(&bad, bytes).unwrap();
    let e = format!("{:#}", Dataset::open(&bad).unwrap_err());
    assert!(e.contains("label 7 but only 3 classes"), "{e}");
}

#[test]
fn pack_command_reports_folder_errors() {
    let dir = tempfile::tempdir().unwrap();
    let args = pack::Args {
        dir: dir.path().join("missing"),
        out: dir.path().join("o.pack"),
        max_side: None,
        quality: 90,
    };
    let e = format!("{:#}", pack::run(args).unwrap_err());
    assert!(e.contains("does not exist"), "{e}");
    assert!(!dir.path().join("o.pack").exists());
}

#[test]
fn bundled_mini_set_packs_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("val.pack");
    let folder = ImageFolder::open(&bundled("val")).unwrap();
    assert_eq!(packed::write_packed(&folder, &out).unwrap(), 200);
    let p = Dataset::open(&out).unwrap();
    let f = Dataset::open(&bundled("val")).unwrap();
    assert_eq!(p.classes(), f.classes());
    for i in (0..200).step_by(13) {
        assert_eq!(
            (p.label(i), p.read(i).unwrap()),
            (f.label(i), f.read(i).unwrap())
        );
    }
}

/// The full Fashion-MNIST packs from `tools/fetch-fashion-mnist.sh --full DIR`; run with
/// `FASHION_MNIST_FULL=DIR cargo test --release --test data_pack -- --ignored`.
#[test]
#[ignore = "needs FASHION_MNIST_FULL=DIR made by tools/fetch-fashion-mnist.sh --full"]
fn full_fashion_mnist_packs() {
    let dir = PathBuf::from(std::env::var("FASHION_MNIST_FULL").expect("FASHION_MNIST_FULL"));
    for (name, n) in [("train.pack", 60_000), ("val.pack", 10_000)] {
        let ds = Arc::new(Dataset::open(&dir.join(name)).unwrap());
        assert_eq!((ds.len(), ds.classes().len()), (n, 10));
        let mut per_class = [0usize; 10];
        (0..n).for_each(|i| per_class[ds.label(i) as usize] += 1);
        assert!(per_class.iter().all(|&c| c == n / 10), "{per_class:?}");
        let loader = Loader::new(ds, LoaderConfig::train(64, 75, 0)).unwrap();
        let t = std::time::Instant::now();
        let images: usize = loader.epoch(0).take(50).map(|b| b.len).sum();
        let rate = images as f64 / t.elapsed().as_secs_f64();
        eprintln!("{name}: {n} images, loader at 75x75: {rate:.0} images/s");
    }
}
