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
        }
    }

    pub fn eval(batch_size: usize, image_size: usize) -> Self {
        Self {
            train: false,
            ..Self::train(batch_size, image_size, 0)
        }
    }
}

/// One batch, NHWC f32. Slots past `len` are zero images with label 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `batch_size * image_size * image_size * 3` values.
    pub images: Vec<f32>,
    /// `batch_size` labels.
    pub labels: Vec<u32>,
    /// Dataset index of each real image (`len` entries).
    pub indices: Vec<usize>,
    /// Number of real images.
    pub len: usize,
    /// Bad files skipped while filling this batch.
    pub skipped: usize,
}

/// Hands out batches of a dataset; see the module docs.
pub struct Loader {
    dataset: Arc<Dataset>,
    cfg: LoaderConfig,
    /// Files already warned about, so each bad file is reported once per run.
    warned: Arc<Mutex<HashSet<usize>>>,
    stats: Arc<Stats>,
    /// Batch buffers handed back by [`Loader::recycle`].
    batch_pool: Arc<Mutex<Vec<Vec<f32>>>>,
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
        if pool.len() < 4 {
            pool.push(batch.images);
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

/// One decoded and transformed image (dataset index and label; its pixels are in the chunk's
/// buffer), or `None` for a bad file.
type Item = Option<(usize, u32)>;

/// A chunk's items and the u8 slots of their pixels (`image_size^2 * 3` bytes per item).
struct Chunk {
    items: Vec<Item>,
    pixels: Vec<u8>,
}

/// What one worker thread reuses from image to image.
struct WorkerState {
    decoder: Decoder,
    decoded: DecodedImage,
    scratch: Scratch,
}

/// Flow control between the consumer and the workers, in units of chunks.
#[derive(Default)]
struct Window {
    next_chunk: usize,
    consumed: usize,
    /// The furthest chunk the consumer has waited for (past `Shared::soft_len` only when bad
    /// files made the epoch need more images).
    wanted: usize,
    stop: bool,
}

/// What the workers of one epoch share.
struct Shared {
    dataset: Arc<Dataset>,
    cfg: LoaderConfig,
    epoch: usize,
    order: Vec<usize>,
    /// Evaluation streams end with the shard; training streams wrap around it.
    stream_len: Option<usize>,
    /// Training: the positions the epoch's batches take when no file is bad. Workers go past it
    /// only when the consumer asks (skips), so no work is wasted after the epoch's last batch.
    soft_len: Option<usize>,
    /// Positions per work chunk.
    chunk: usize,
    /// Chunks the workers may run ahead of the consumer.
    window: usize,
    /// Batches of a whole (training) epoch.
    total_batches: usize,
    state: Mutex<Window>,
    wake: Condvar,
    warned: Arc<Mutex<HashSet<usize>>>,
    stats: Arc<Stats>,
    /// Chunk pixel buffers the consumer has finished with, and idle worker states.
    reuse: Arc<Reuse>,
    batch_pool: Arc<Mutex<Vec<Vec<f32>>>>,
}

impl Shared {
    /// Waits until chunk `next_chunk` is inside the window, then claims it. `None`: stop.
    fn claim(&self) -> Option<usize> {
        let mut s = self.state.lock().unwrap();
        let beyond = |k: usize, wanted: usize| {
            self.soft_len.is_some_and(|len| k * self.chunk >= len) && k > wanted
        };
        while !s.stop
            && (s.next_chunk >= s.consumed + self.window || beyond(s.next_chunk, s.wanted))
        {
            s = self.wake.wait(s).unwrap();
        }
        let k = s.next_chunk;
        let past_end = self.stream_len.is_some_and(|len| k * self.chunk >= len);
        if s.stop || past_end {
            return None;
        }
        s.next_chunk += 1;
        Some(k)
    }

    /// Evaluation: the shorter side's length before the centre crop.
    fn eval_resize(&self) -> usize {
        super::transform::eval_resize(self.cfg.image_size, self.cfg.crop_pct)
    }

    fn warn(&self, index: usize, e: &anyhow::Error) {
        if self.warned.lock().unwrap().insert(index) {
            eprintln!("warning: skipping bad image: {e:#}");
        }
    }

    /// Loads the image at `position` into `slot` (u8 RGB, `image_size^2 * 3` bytes).
    fn load(&self, position: usize, w: &mut WorkerState, slot: &mut [u8]) -> Item {
        let n = self.order.len();
        let (index, pass) = (self.order[position % n], position / n);
        match self.load_into(index, pass, w, slot) {
            Ok(()) => Some((index, self.dataset.label(index))),
            Err(e) => {
                self.warn(index, &e);
                None
            }
        }
    }

    fn load_into(
        &self,
        index: usize,
        pass: usize,
        w: &mut WorkerState,
        slot: &mut [u8],
    ) -> Result<()> {
        let t = Instant::now();
        let bytes = self.dataset.bytes(index)?;
        let t = add_ns(&self.stats.read_ns, t);
        let describe = || self.dataset.describe(index);
        let size = self.cfg.image_size;
        let header = w.decoder.header(&bytes).with_context(describe)?;
        let full = (header.width, header.height);
        let draws = self.cfg.train.then(|| {
            // `pass` only differs from 0 when skips made the epoch wrap around its shard.
            let seed = hash_seed(&[
                AUGMENT_TAG,
                self.cfg.seed,
                self.epoch as u64,
                index as u64,
                pass as u64,
            ]);
            draw_train(
                full.0,
                full.1,
                &self.cfg.augment,
                &mut ChaCha8Rng::seed_from_u64(seed),
            )
        });
        let min_side = match &draws {
            Some(d) => d.crop.width.min(d.crop.height) as f64,
            None => Region::eval(full, full, self.eval_resize(), size).min_side(),
        };
        let denom = if self.cfg.scaled_decode && header.jpeg && w.decoder.uses_turbo() {
            scale_denominator(min_side, size)
        } else {
            1
        };
        w.decoder
            .decode_into(&bytes, denom, &mut w.decoded)
            .with_context(describe)?;
        let t = add_ns(&self.stats.decode_ns, t);
        match &draws {
            Some(d) => train_u8_into(&w.decoded, full, d, size, slot, &mut w.scratch),
            None => eval_u8_into(
                &w.decoded,
                full,
                self.eval_resize(),
                size,
                slot,
                &mut w.scratch,
            ),
        }
        .with_context(describe)?;
        add_ns(&self.stats.transform_ns, t);
        self.stats.loaded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The JPEG decoding scale 1/d (d in 1, 2, 4, 8): the largest that keeps the source region's
/// shorter side, `min_side` full-scale pixels, at least `size` pixels.
pub fn scale_denominator(min_side: f64, size: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|&d| min_side >= (d * size) as f64)
        .unwrap_or(1)
}

fn worker(shared: &Shared, tx: &Sender<(usize, Chunk)>) {
    let reused = shared.reuse.workers.lock().unwrap().pop();
    let mut w = reused.unwrap_or_else(|| WorkerState {
        // Checked in `Loader::new`; Auto never fails.
        decoder: Decoder::new(shared.cfg.jpeg)
            .unwrap_or_else(|_| Decoder::new(JpegBackend::Zune).unwrap()),
        decoded: DecodedImage {
            width: 0,
            height: 0,
            pixels: Vec::new(),
        },
        scratch: Scratch::default(),
    });
    let pixels = shared.cfg.image_size * shared.cfg.image_size * 3;
    while let Some(k) = shared.claim() {
        let end = (k + 1) * shared.chunk;
        let end = shared.stream_len.map_or(end, |len| len.min(end));
        let start = k * shared.chunk;
        let mut buf = shared
            .reuse
            .chunks
            .lock()
            .unwrap()
            .pop()
            .unwrap_or_default();
        buf.resize((end - start) * pixels, 0);
        let items = (start..end)
            .zip(buf.chunks_exact_mut(pixels))
            .map(|(p, slot)| shared.load(p, &mut w, slot))
            .collect();
        let chunk = Chunk { items, pixels: buf };
        if tx.send((k, chunk)).is_err() {
            break;
        }
    }
    shared.reuse.workers.lock().unwrap().push(w);
}

/// The batches of one epoch, in order.
pub struct Epoch {
    shared: Arc<Shared>,
    rx: Receiver<(usize, Chunk)>,
    workers: Vec<JoinHandle<()>>,
    /// Chunks received but not yet consumed, by chunk number, with the next item's slot.
    pending: BTreeMap<usize, (Chunk, usize)>,
    /// Next stream position to consume.
    position: usize,
    /// Training batches still to hand out.
    batches_left: usize,
    skipped: usize,
    /// Good images since the stream last passed a shard boundary; guards a shard of only bad
    /// files from looping forever.
    good_since_wrap: usize,
}

impl Epoch {
    /// Bad files skipped so far in this epoch.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// How far this epoch has come, for [`Loader::epoch_from`]. Training epochs only: an
    /// evaluation stream has no batch budget to resume.
    pub fn position(&self) -> EpochPosition {
        let total = self.shared.total_batches;
        EpochPosition {
            batches: total - self.batches_left,
            position: self.position,
            skipped: self.skipped,
            good_since_wrap: self.good_since_wrap,
        }
    }

    /// The item at the current position, waiting for its chunk if needed; a good item's pixels
    /// are normalised into `dst` (skipped when `None`). `None`: stream over.
    fn next_item(&mut self, dst: Option<&mut [f32]>) -> Option<Item> {
        let sh = self.shared.clone();
        if sh.stream_len.is_some_and(|len| self.position >= len) {
            return None;
        }
        let k = self.position / sh.chunk;
        if !self.pending.contains_key(&k) {
            let mut s = sh.state.lock().unwrap();
            if s.wanted < k {
                s.wanted = k;
                sh.wake.notify_all();
            }
        }
        while !self.pending.contains_key(&k) {
            let (number, chunk) = self
                .rx
                .recv()
                .expect("a data loader worker thread panicked");
            self.pending.insert(number, (chunk, 0));
        }
        let (chunk, i) = self.pending.get_mut(&k).unwrap();
        let item = chunk.items[*i];
        if let (Some(_), Some(dst)) = (item, dst) {
            let t = Instant::now();
            let n = dst.len();
            normalize_u8_into(
                &chunk.pixels[*i * n..(*i + 1) * n],
                dst,
                &sh.cfg.normalization,
            );
            add_ns(&sh.stats.pack_ns, t);
            sh.stats.images.fetch_add(1, Ordering::Relaxed);
        }
        *i += 1;
        self.position += 1;
        if self.position.is_multiple_of(sh.chunk) || sh.stream_len == Some(self.position) {
            let (chunk, _) = self.pending.remove(&k).unwrap();
            sh.reuse.chunks.lock().unwrap().push(chunk.pixels);
            sh.state.lock().unwrap().consumed = k + 1;
            sh.wake.notify_all();
        }
        Some(item)
    }

    /// True when a whole pass over the shard produced nothing usable.
    fn all_bad(&mut self) -> bool {
        let n = self.shared.order.len();
        if !self.position.is_multiple_of(n) {
            return false;
        }
        let all_bad = self.good_since_wrap == 0;
        self.good_since_wrap = 0;
        if all_bad {
            eprintln!("warning: every image of this shard failed to load; ending the epoch early");
        }
        all_bad
    }
}

impl Iterator for Epoch {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let cfg = &self.shared.cfg;
        let (train, b, pixels) = (
            cfg.train,
            cfg.batch_size,
            cfg.image_size * cfg.image_size * 3,
        );
        if train && self.batches_left == 0 {
            return None;
        }
        let t = Instant::now();
        let images = self.shared.batch_pool.lock().unwrap().pop();
        let images = match images {
            Some(v) if v.len() == b * pixels => v,
            _ => vec![0.0; b * pixels],
        };
        add_ns(&self.shared.stats.pack_ns, t);
        let mut batch = Batch {
            images,
            labels: vec![0; b],
            indices: Vec::with_capacity(b),
            len: 0,
            skipped: 0,
        };
        while batch.len < b {
            let slot = batch.len * pixels..(batch.len + 1) * pixels;
            let Some(item) = self.next_item(Some(&mut batch.images[slot])) else {
                break;
            };
            match item {
                Some((index, label)) => {
                    batch.labels[batch.len] = label;
                    batch.indices.push(index);
                    batch.len += 1;
                    self.good_since_wrap += 1;
                }
                None => batch.skipped += 1,
            }
            if train && self.all_bad() {
                self.batches_left = 0;
                self.skipped += batch.skipped;
                return None;
            }
        }
        self.skipped += batch.skipped;
        // A recycled buffer holds old images past the real ones: slots past `len` are zero.
        batch.images[batch.len * pixels..].fill(0.0);
        if train {
            self.batches_left -= 1;
        }
        (batch.len > 0).then_some(batch)
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().stop = true;
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
