//! Background loader threads: decode + transform on workers, batches assembled in a fixed order.
//!
//! Determinism: an epoch is a stream of positions over this rank's shard of a shuffled order that
//! depends only on (seed, epoch). Workers process chunks of positions in any order and at any
//! speed; the consumer takes results strictly by position. Each image's augmentation is seeded by
//! (seed, epoch, image index), so batches are identical for any worker count.
//!
//! Work per image (on the worker threads): read the bytes, read the header, draw the
//! augmentation, decode (at 1/2, 1/4 or 1/8 scale when the crop is at least that many times the
//! output size and libjpeg-turbo is there), resize the crop straight into the image's u8 slot in
//! a chunk buffer and flip and jitter it in place. The consumer normalises each slot into the
//! batch's f32 buffer (the packing step). Chunk buffers and batch buffers are recycled, and each
//! worker reuses its decode buffer, so steady state allocates no image-sized memory.
//!
//! Bad data: an image that fails to read or decode is skipped (warned about once per file) and
//! the batch is filled from the next positions, so training batches stay full. A training epoch
//! wraps around its shard if skips leave it short, so every epoch has `batches_per_epoch` steps.

use super::dataset::Dataset;
use super::decode::{DecodedImage, Decoder, JpegBackend};
use super::fast::{eval_u8_into, normalize_u8_into, train_u8_into, Region, Scratch};
use super::transform::{draw_train, AugmentConfig, Normalization};
use crate::backend::Images;
use anyhow::{ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

mod epoch;

pub use epoch::Epoch;
use epoch::{worker, Shared, Window, WorkerState};

/// Loader settings. Start from [`LoaderConfig::train`] or [`LoaderConfig::eval`].
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Output images are `image_size` x `image_size`.
    pub image_size: usize,
    pub seed: u64,
    /// Worker threads; 0 means one per available core.
    pub workers: usize,
    pub rank: usize,
    pub world_size: usize,
    /// Training: shuffle, augment, drop the last partial batch. Evaluation: every image of the
    /// shard once, in dataset order, the last batch possibly short.
    pub train: bool,
    pub augment: AugmentConfig,
    /// Pixel normalisation (training and evaluation).
    pub normalization: Normalization,
    /// Evaluation: the centre crop's share of the resized shorter side (timm's `crop_pct`; 1:
    /// resize the shorter side to `image_size`).
    pub crop_pct: f64,
    /// How many batches the workers may prepare ahead of the consumer.
    pub prefetch: usize,
    /// The JPEG decoder.
    pub jpeg: JpegBackend,
    /// Decode JPEGs at a reduced scale when the crop allows it (libjpeg-turbo only).
    pub scaled_decode: bool,
    /// Hand out the u8 pixels (`Batch::pixels`) instead of normalised f32, for a backend that
    /// normalises on its device ([`crate::backend::InputFormat::U8`]).
    pub u8_batches: bool,
}

impl LoaderConfig {
    pub fn train(batch_size: usize, image_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            image_size,
            seed,
            workers: 0,
            rank: 0,
            world_size: 1,
            train: true,
            augment: AugmentConfig::default(),
            normalization: Normalization::IMAGENET,
            crop_pct: 1.0,
            prefetch: 4,
            jpeg: JpegBackend::Auto,
            scaled_decode: true,
            u8_batches: false,
        }
    }

    pub fn eval(batch_size: usize, image_size: usize) -> Self {
        Self {
            train: false,
            ..Self::train(batch_size, image_size, 0)
        }
    }
}

/// One batch, NHWC: normalised f32 or (with `LoaderConfig::u8_batches`) u8 pixels. Slots past
/// `len` are zero images with label 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `batch_size * image_size * image_size * 3` values (empty for a u8 batch).
    pub images: Vec<f32>,
    /// The u8 pixels of a u8 batch, as many values (empty for an f32 batch).
    pub pixels: Vec<u8>,
    /// The normalisation of the pixels.
    pub norm: Normalization,
    /// `batch_size` labels.
    pub labels: Vec<u32>,
    /// Dataset index of each real image (`len` entries).
    pub indices: Vec<usize>,
    /// Number of real images.
    pub len: usize,
    /// Bad files skipped while filling this batch.
    pub skipped: usize,
}

impl Batch {
    /// The batch as a backend takes it.
    pub fn input(&self) -> Images<'_> {
        if self.images.is_empty() {
            Images::U8 {
                pixels: &self.pixels,
                norm: self.norm.factors(),
            }
        } else {
            Images::F32(&self.images)
        }
    }
}

/// Recycled batch buffers: f32 images and u8 pixels.
pub(super) type BatchPool = (Vec<Vec<f32>>, Vec<Vec<u8>>);

/// Hands out batches of a dataset; see the module docs.
pub struct Loader {
    dataset: Arc<Dataset>,
    cfg: LoaderConfig,
    /// Files already warned about, so each bad file is reported once per run.
    warned: Arc<Mutex<HashSet<usize>>>,
    stats: Arc<Stats>,
    /// Batch buffers handed back by [`Loader::recycle`].
    batch_pool: Arc<Mutex<BatchPool>>,
    /// Kept across epochs: chunk buffers and the workers' decoders and buffers.
    reuse: Arc<Reuse>,
}

#[derive(Default)]
struct Reuse {
    chunks: Mutex<Vec<Vec<u8>>>,
    workers: Mutex<Vec<WorkerState>>,
}

/// Time spent per stage of the pipeline, summed over the threads that ran it (seconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StageTimes {
    /// Reading the encoded bytes (file reads; nothing for a packed file's map until touched).
    pub read: f64,
    /// Header, augmentation draws and decoding.
    pub decode: f64,
    /// Resize, flip and colour jitter into the u8 slot.
    pub transform: f64,
    /// Normalising the slots into the batch's f32 buffer (on the consumer's thread).
    pub pack: f64,
    /// Images packed into batches.
    pub images: u64,
    /// Images the workers read, decoded and transformed (the workers may be ahead).
    pub loaded: u64,
}

#[derive(Default)]
struct Stats {
    read_ns: AtomicU64,
    decode_ns: AtomicU64,
    transform_ns: AtomicU64,
    pack_ns: AtomicU64,
    images: AtomicU64,
    /// Images the workers finished (may run ahead of `images`, which are packed).
    loaded: AtomicU64,
}

fn add_ns(counter: &AtomicU64, since: Instant) -> Instant {
    let now = Instant::now();
    counter.fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
    now
}

impl Loader {
    pub fn new(dataset: Arc<Dataset>, mut cfg: LoaderConfig) -> Result<Self> {
        ensure!(cfg.batch_size >= 1, "batch size must be at least 1");
        ensure!(cfg.image_size >= 1, "image size must be at least 1");
        ensure!(cfg.world_size >= 1, "world size must be at least 1");
        ensure!(
            cfg.rank < cfg.world_size,
            "rank {} is not below world size {}",
            cfg.rank,
            cfg.world_size
        );
        cfg.augment.validate()?;
        super::transform::check_crop_pct(cfg.crop_pct)?;
        Decoder::new(cfg.jpeg)?;
        if cfg.workers == 0 {
            cfg.workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
        let loader = Self {
            dataset,
            cfg,
            warned: Arc::default(),
            stats: Arc::default(),
            batch_pool: Arc::default(),
            reuse: Arc::default(),
        };
        if loader.cfg.train {
            let shard = loader.shard_range().len();
            ensure!(
                shard >= loader.cfg.batch_size,
                "training shard has {shard} images ({} in the dataset, world size {}), fewer than the batch size {}",
                loader.dataset.len(),
                loader.cfg.world_size,
                loader.cfg.batch_size
            );
        }
        Ok(loader)
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Hands out u8 batches from the next epoch on (see [`LoaderConfig::u8_batches`]): the
    /// backend, built after the loader, says which format it takes.
    pub fn set_u8_batches(&mut self, on: bool) {
        self.cfg.u8_batches = on;
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Dataset indices of the bad files met so far (each was warned about once), sorted.
    pub fn bad_files(&self) -> Vec<usize> {
        let mut bad: Vec<usize> = self.warned.lock().unwrap().iter().copied().collect();
        bad.sort_unstable();
        bad
    }

    /// Time per pipeline stage since the loader was made (all epochs).
    pub fn stage_times(&self) -> StageTimes {
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 * 1e-9;
        StageTimes {
            read: s(&self.stats.read_ns),
            decode: s(&self.stats.decode_ns),
            transform: s(&self.stats.transform_ns),
            pack: s(&self.stats.pack_ns),
            images: self.stats.images.load(Ordering::Relaxed),
            loaded: self.stats.loaded.load(Ordering::Relaxed),
        }
    }

    /// Hands a batch's image buffer back for a later batch to reuse (optional: a batch that is
    /// just dropped costs a fresh allocation).
    pub fn recycle(&self, batch: Batch) {
        let mut pool = self.batch_pool.lock().unwrap();
        if pool.0.len() < 4 && !batch.images.is_empty() {
            pool.0.push(batch.images);
        }
        if pool.1.len() < 4 && !batch.pixels.is_empty() {
            pool.1.push(batch.pixels);
        }
    }

    /// Training: full batches only. Evaluation: enough batches for every image of the shard
    /// (fewer may come if bad files are skipped).
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.shard_range().len();
        if self.cfg.train {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// Positions of this rank's shard in the epoch order. Training shards are equal in size (the
    /// remainder of the shuffled order is left out this epoch); evaluation shards cover every
    /// image, their sizes differing by at most one.
    fn shard_range(&self) -> std::ops::Range<usize> {
        let (n, r, w) = (self.dataset.len(), self.cfg.rank, self.cfg.world_size);
        if self.cfg.train {
            let per_rank = n / w;
            r * per_rank..(r + 1) * per_rank
        } else {
            r * n / w..(r + 1) * n / w
        }
    }

    /// The dataset indices this rank reads in `epoch`, in order (before any skips).
    pub fn shard(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.cfg.train {
            let mut rng =
                ChaCha8Rng::seed_from_u64(hash_seed(&[ORDER_TAG, self.cfg.seed, epoch as u64]));
            order.shuffle(&mut rng);
        }
        order[self.shard_range()].to_vec()
    }

    /// Starts the workers for `epoch` and returns its batches. Dropping the iterator stops them.
    pub fn epoch(&self, epoch: usize) -> Epoch {
        self.epoch_from(epoch, EpochPosition::default())
    }

    /// The batches of `epoch` after the point `from` (taken from [`Epoch::position`] of the same
    /// epoch with the same dataset, seed and batch size): the same batches an uninterrupted epoch
    /// hands out from there, bit for bit.
    pub fn epoch_from(&self, epoch: usize, from: EpochPosition) -> Epoch {
        let order = self.shard(epoch);
        let chunk = self.cfg.batch_size.div_ceil(self.cfg.workers).max(1);
        let chunks_per_batch = self.cfg.batch_size.div_ceil(chunk);
        let shared = Arc::new(Shared {
            dataset: self.dataset.clone(),
            cfg: self.cfg.clone(),
            epoch,
            stream_len: (!self.cfg.train).then_some(order.len()),
            soft_len: self
                .cfg
                .train
                .then(|| self.batches_per_epoch() * self.cfg.batch_size),
            order,
            chunk,
            window: (self.cfg.prefetch + 1) * chunks_per_batch,
            total_batches: self.batches_per_epoch(),
            state: Mutex::new(Window {
                next_chunk: from.position / chunk,
                consumed: from.position / chunk,
                wanted: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            warned: self.warned.clone(),
            stats: self.stats.clone(),
            reuse: self.reuse.clone(),
            batch_pool: self.batch_pool.clone(),
        });
        let (tx, rx) = channel();
        let workers = (0..self.cfg.workers)
            .map(|_| {
                let (shared, tx) = (shared.clone(), tx.clone());
                std::thread::spawn(move || worker(&shared, &tx))
            })
            .collect();
        let mut epoch = Epoch {
            shared,
            rx,
            workers,
            pending: BTreeMap::new(),
            position: from.position - from.position % chunk,
            batches_left: self.batches_per_epoch().saturating_sub(from.batches),
            skipped: from.skipped,
            good_since_wrap: from.good_since_wrap,
        };
        // The workers start at the chunk holding `from.position`; the items before it in that
        // chunk were consumed before the interruption.
        while epoch.position < from.position {
            if epoch.next_item(None).is_none() {
                break;
            }
        }
        epoch
    }
}

/// Where an epoch's stream of batches stands: what a mid-epoch checkpoint records so a resumed
/// run continues from the same image of the same shuffle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EpochPosition {
    /// Batches handed out so far.
    pub batches: usize,
    /// Next stream position (images read, bad ones included; past the shard when it wrapped).
    pub position: usize,
    /// Bad files skipped so far.
    pub skipped: usize,
    /// Good images since the stream last passed a shard boundary.
    pub good_since_wrap: usize,
}

const ORDER_TAG: u64 = 0x6f_7264_6572; // "order"
const AUGMENT_TAG: u64 = 0x6175_676d; // "augm"

/// splitmix64's finaliser: spreads nearby inputs (epoch 1, 2, ...) to unrelated seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0, |h, &p| mix(h ^ p))
}
