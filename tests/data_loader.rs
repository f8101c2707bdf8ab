//! Loader: determinism across worker counts, epochs, sharding, evaluation coverage, bad files.

#[path = "data_helpers.rs"]
mod helpers;

use helpers::*;
use inception_engine::data::{Batch, Dataset, EpochPosition, Loader, LoaderConfig};
use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;

fn dataset(root: &Path) -> Arc<Dataset> {
    Arc::new(Dataset::open(root).unwrap())
}

/// 3 classes x 7 images = 21 images.
fn small_folder() -> (tempfile::TempDir, Arc<Dataset>) {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &["a", "b", "c"], 7);
    let ds = dataset(dir.path());
    (dir, ds)
}

fn train_cfg(batch: usize, workers: usize) -> LoaderConfig {
    LoaderConfig {
        workers,
        prefetch: 2,
        ..LoaderConfig::train(batch, 16, 42)
    }
}

fn collect(loader: &Loader, epoch: usize) -> Vec<Batch> {
    loader.epoch(epoch).collect()
}

#[test]
fn identical_batches_for_any_worker_count() {
    let (_dir, ds) = small_folder();
    let reference = collect(&Loader::new(ds.clone(), train_cfg(4, 1)).unwrap(), 0);
    assert_eq!(
        reference.len(),
        5,
        "21 images / batch 4, last partial batch dropped"
    );
    for workers in [2, 3, 8] {
        let loader = Loader::new(ds.clone(), train_cfg(4, workers)).unwrap();
        assert_eq!(collect(&loader, 0), reference, "workers = {workers}");
    }
    // Prefetch depth does not matter either.
    let cfg = LoaderConfig {
        prefetch: 0,
        ..train_cfg(4, 2)
    };
    assert_eq!(collect(&Loader::new(ds, cfg).unwrap(), 0), reference);
}

/// A backend that normalises on its device takes u8 batches: the same images, labels and order
/// as the f32 batches, whose values are those pixels normalised.
#[test]
fn u8_batches_are_the_f32_batches_before_normalisation() {
    let (_dir, ds) = small_folder();
    let f32_batches = collect(&Loader::new(ds.clone(), train_cfg(4, 2)).unwrap(), 1);
    let mut loader = Loader::new(ds, train_cfg(4, 3)).unwrap();
    loader.set_u8_batches(true);
    let u8_batches = collect(&loader, 1);
    assert_eq!(u8_batches.len(), f32_batches.len());
    for (a, b) in f32_batches.iter().zip(&u8_batches) {
        assert!(b.images.is_empty() && a.pixels.is_empty());
        assert_eq!(
            (&a.labels, &a.indices, a.len),
            (&b.labels, &b.indices, b.len)
        );
        let input = b.input();
        let normalised = input.to_f32();
        assert_eq!(&normalised[..], &a.images[..]);
        assert!(b.pixels.iter().any(|&v| v != 0));
    }
}

#[test]
fn training_batches_are_full_shuffled_and_labelled() {
    let (_dir, ds) = small_folder();
    let loader = Loader::new(ds.clone(), train_cfg(4, 2)).unwrap();
    assert_eq!(loader.batches_per_epoch(), 5);
    let batches = collect(&loader, 0);
    let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen.len(), 20);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        20,
        "no image twice"
    );
    assert_ne!(seen, (0..20).collect::<Vec<_>>(), "shuffled");
    for b in &batches {
        assert_eq!((b.len, b.skipped), (4, 0));
        assert_eq!(b.images.len(), 4 * 16 * 16 * 3);
        for (slot, &i) in b.indices.iter().enumerate() {
            assert_eq!(b.labels[slot], ds.label(i));
        }
    }
}

#[test]
fn epochs_differ_and_seeds_differ() {
    let (_dir, ds) = small_folder();
    let loader = Loader::new(ds.clone(), train_cfg(4, 2)).unwrap();
    assert_ne!(loader.shard(0), loader.shard(1));
    let e0 = collect(&loader, 0);
    let e1 = collect(&loader, 1);
    assert_ne!(e0[0].indices, e1[0].indices);
    assert_eq!(collect(&loader, 0), e0, "an epoch can be replayed");
    let other_seed = Loader::new(
        ds,
        LoaderConfig {
            seed: 7,
            ..train_cfg(4, 2)
        },
    )
    .unwrap();
    assert_ne!(other_seed.shard(0), loader.shard(0));
}

#[test]
fn augmentation_depends_on_epoch() {
    // One image, batch 1: only the augmentation can change between epochs.
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &["a"], 1);
    let loader = Loader::new(dataset(dir.path()), train_cfg(1, 1)).unwrap();
    let a = collect(&loader, 0);
    let b = collect(&loader, 1);
    assert_eq!(a[0].indices, b[0].indices);
    assert_ne!(a[0].images, b[0].images);
}

#[test]
fn shards_are_disjoint_equal_and_from_one_order() {
    let (_dir, ds) = small_folder();
    let world = 4;
    let shards: Vec<Vec<usize>> = (0..world)
        .map(|rank| {
            let cfg = LoaderConfig {
                rank,
                world_size: world,
                ..train_cfg(2, 2)
            };
            Loader::new(ds.clone(), cfg).unwrap().shard(3)
        })
        .collect();
    let all: Vec<usize> = shards.concat();
    assert!(shards.iter().all(|s| s.len() == 21 / world));
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        all.len(),
        "disjoint"
    );
    let single = Loader::new(ds.clone(), train_cfg(2, 2)).unwrap().shard(3);
    assert_eq!(
        all,
        single[..all.len()],
        "shards are slices of the same shuffled order"
    );

    // The batches each rank produces hold exactly its shard's images.
    for (rank, shard) in shards.iter().enumerate() {
        let cfg = LoaderConfig {
            rank,
            world_size: world,
            ..train_cfg(2, 2)
        };
        let got: Vec<usize> = collect(&Loader::new(ds.clone(), cfg).unwrap(), 3)
            .iter()
            .flat_map(|b| b.indices.clone())
            .collect();
        assert_eq!(got, shard[..4]);
    }
}

#[test]
fn eval_shards_cover_every_image_once() {
    let (_dir, ds) = small_folder();
    let mut all = Vec::new();
    for rank in 0..4 {
        let cfg = LoaderConfig {
            rank,
            world_size: 4,
            ..LoaderConfig::eval(2, 8)
        };
        all.extend(
            collect(&Loader::new(ds.clone(), cfg).unwrap(), 0)
                .iter()
                .flat_map(|b| b.indices.clone()),
        );
    }
    assert_eq!(all, (0..21).collect::<Vec<_>>());
}

#[test]
fn eval_yields_every_image_in_order_with_a_short_last_batch() {
    let (_dir, ds) = small_folder();
    let cfg = LoaderConfig {
        workers: 3,
        ..LoaderConfig::eval(4, 10)
    };
    let loader = Loader::new(ds.clone(), cfg).unwrap();
    assert_eq!(loader.batches_per_epoch(), 6);
    let batches = collect(&loader, 0);
    let lens: Vec<usize> = batches.iter().map(|b| b.len).collect();
    assert_eq!(lens, [4, 4, 4, 4, 4, 1]);
    let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen, (0..21).collect::<Vec<_>>());
    let last = batches.last().unwrap();
    assert_eq!(last.labels[..], [2, 0, 0, 0], "padded labels are 0");
    assert!(
        last.images[10 * 10 * 3..].iter().all(|&v| v == 0.0),
        "padding is zero"
    );
    assert!(last.images[..10 * 10 * 3].iter().any(|&v| v != 0.0));
    // Evaluation ignores the seed and the epoch.
    let other = LoaderConfig {
        seed: 99,
        ..LoaderConfig::eval(4, 10)
    };
    assert_eq!(collect(&Loader::new(ds, other).unwrap(), 5), batches);
}

/// 3 classes x 7 images, four of them broken in different ways.
fn folder_with_bad_files() -> (tempfile::TempDir, Arc<Dataset>, HashSet<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let files = make_folder(dir.path(), &["a", "b", "c"], 7);
    fs::write(&files[2], "this is not an image").unwrap();
    let png = fs::read(&files[9]).unwrap();
    fs::write(&files[9], &png[..png.len() / 2]).unwrap(); // truncated
    fs::write(&files[15], []).unwrap(); // empty
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode_image(&rgb_image(30, 30, 0))
        .unwrap();
    fs::write(&files[20], &jpeg[..jpeg.len() / 3]).unwrap(); // truncated JPEG
    let ds = dataset(dir.path());
    let bad: HashSet<usize> = (0..ds.len()).filter(|&i| ds.read(i).is_err()).collect();
    assert_eq!(
        bad,
        HashSet::from([2, 9, 15, 20]),
        "each broken file must fail to decode"
    );
    (dir, ds, bad)
}

#[test]
fn bad_files_are_skipped_counted_and_batches_stay_full() {
    let (_dir, ds, bad) = folder_with_bad_files();
    let loader = Loader::new(ds.clone(), train_cfg(4, 2)).unwrap();
    let mut epoch = loader.epoch(0);
    let batches: Vec<Batch> = epoch.by_ref().collect();
    assert_eq!(
        batches.len(),
        loader.batches_per_epoch(),
        "skips never cost a step"
    );
    let pixels = 16 * 16 * 3;
    for b in &batches {
        assert_eq!((b.len, b.indices.len()), (4, 4));
        for slot in 0..4 {
            let img = &b.images[slot * pixels..(slot + 1) * pixels];
            assert!(img.iter().any(|&v| v != 0.0), "slot {slot} is a hole");
        }
    }
    assert!(batches
        .iter()
        .flat_map(|b| &b.indices)
        .all(|i| !bad.contains(i)));
    let per_batch: usize = batches.iter().map(|b| b.skipped).sum();
    assert_eq!(epoch.skipped(), per_batch);
    // The 20 images of the shuffled order include at least three of the four bad ones.
    let in_order = loader.shard(0).iter().filter(|i| bad.contains(i)).count();
    assert!(
        per_batch >= in_order.min(3) && per_batch >= 3,
        "skipped {per_batch}"
    );
    // Still deterministic across worker counts.
    let again = collect(&Loader::new(ds, train_cfg(4, 5)).unwrap(), 0);
    assert_eq!(again, batches);
}

#[test]
fn an_epoch_resumed_from_any_position_hands_out_the_same_remaining_batches() {
    // Bad files (skips shift the batch boundaries) and a wrap past the shard's end (four bad
    // files in 21 leave fewer than 5 batches of 4 in one pass).
    let (_dir, ds, _bad) = folder_with_bad_files();
    let loader = Loader::new(ds.clone(), train_cfg(4, 2)).unwrap();
    let mut epoch = loader.epoch(1);
    let mut positions = vec![epoch.position()];
    let mut batches = Vec::new();
    while let Some(b) = epoch.next() {
        batches.push(b);
        positions.push(epoch.position());
    }
    assert_eq!(batches.len(), 5);
    assert_eq!(positions[0], EpochPosition::default());
    assert!(
        positions.last().unwrap().position > 20,
        "the stream wrapped: {positions:?}"
    );
    assert!(
        positions.iter().any(|p| p.position != p.batches * 4),
        "skips moved a boundary: {positions:?}"
    );
    for (k, &from) in positions.iter().enumerate() {
        assert_eq!(from.batches, k);
        for workers in [1, 3] {
            let other = Loader::new(ds.clone(), train_cfg(4, workers)).unwrap();
            let mut resumed = other.epoch_from(1, from);
            let rest: Vec<Batch> = resumed.by_ref().collect();
            assert_eq!(rest, batches[k..], "from batch {k}, {workers} workers");
            assert_eq!(resumed.position(), *positions.last().unwrap());
            assert_eq!(resumed.skipped(), epoch.skipped());
        }
    }
}

#[test]
fn eval_skips_bad_files_and_keeps_the_rest() {
    let (_dir, ds, bad) = folder_with_bad_files();
    let loader = Loader::new(
        ds,
        LoaderConfig {
            workers: 2,
            ..LoaderConfig::eval(4, 8)
        },
    )
    .unwrap();
    let mut epoch = loader.epoch(0);
    let batches: Vec<Batch> = epoch.by_ref().collect();
    let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    let expect: Vec<usize> = (0..21).filter(|i| !bad.contains(i)).collect();
    assert_eq!(seen, expect);
    assert_eq!(
        batches.iter().map(|b| b.len).collect::<Vec<_>>(),
        [4, 4, 4, 4, 1]
    );
    assert_eq!(epoch.skipped(), 4);
    drop(epoch);
    let again: Vec<Batch> = loader.epoch(1).collect();
    assert_eq!(again, batches, "evaluation repeats exactly");
    let mut expect_bad: Vec<usize> = bad.into_iter().collect();
    expect_bad.sort();
    assert_eq!(
        loader.bad_files(),
        expect_bad,
        "each bad file recorded (and warned) once"
    );
}

#[test]
fn a_shard_of_only_bad_files_ends_the_epoch_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("a")).unwrap();
    for i in 0..6 {
        fs::write(dir.path().join(format!("a/{i}.png")), "garbage").unwrap();
    }
    let loader = Loader::new(dataset(dir.path()), train_cfg(2, 2)).unwrap();
    let mut epoch = loader.epoch(0);
    assert!(epoch.next().is_none());
    assert_eq!(epoch.skipped(), 6);
}

#[test]
fn dropping_an_epoch_early_stops_its_workers() {
    let (_dir, ds) = small_folder();
    let loader = Loader::new(ds, train_cfg(2, 4)).unwrap();
    let mut epoch = loader.epoch(0);
    assert!(epoch.next().is_some());
    drop(epoch); // must return (joins the workers) rather than hang
    assert_eq!(collect(&loader, 0).len(), 10);
}

#[test]
fn bad_settings_are_errors() {
    let (_dir, ds) = small_folder();
    let cases = [
        train_cfg(22, 1),
        LoaderConfig {
            image_size: 0,
            ..train_cfg(2, 1)
        },
        LoaderConfig {
            batch_size: 0,
            ..train_cfg(2, 1)
        },
        LoaderConfig {
            rank: 2,
            world_size: 2,
            ..train_cfg(2, 1)
        },
        LoaderConfig {
            world_size: 0,
            ..train_cfg(2, 1)
        },
        LoaderConfig {
            world_size: 11,
            ..train_cfg(2, 1)
        },
    ];
    for cfg in cases {
        assert!(Loader::new(ds.clone(), cfg.clone()).is_err(), "{cfg:?}");
    }
    let e = Loader::new(ds, train_cfg(22, 1)).err().unwrap().to_string();
    assert!(e.contains("fewer than the batch size 22"), "{e}");
}

#[test]
fn bundled_train_split_loads_at_75() {
    let ds = dataset(&bundled("train"));
    let cfg = LoaderConfig {
        image_size: 75,
        ..LoaderConfig::train(32, 75, 1)
    };
    let loader = Loader::new(ds, cfg).unwrap();
    assert_eq!(loader.batches_per_epoch(), 15);
    let batches = collect(&loader, 0);
    assert_eq!(batches.len(), 15);
    let labels: HashSet<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels.len(), 10);
}
