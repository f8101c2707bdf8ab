//! One epoch of the loader: the state its worker threads share (the shuffled order, the window of
//! chunks they may run ahead, the recycled buffers), the worker loop, and [`Epoch`], the iterator
//! that hands out the batches in order.

// The loader's types, settings and imports (this is the other half of its module).
use super::*;

/// One decoded and transformed image (dataset index and label; its pixels are in the chunk's
/// buffer), or `None` for a bad file.
type Item = Option<(usize, u32)>;

/// A chunk's items and the u8 slots of their pixels (`image_size^2 * 3` bytes per item).
pub(super) struct Chunk {
    pub(super) items: Vec<Item>,
    pub(super) pixels: Vec<u8>,
}

/// What one worker thread reuses from image to image.
pub(super) struct WorkerState {
    pub(super) decoder: Decoder,
    pub(super) decoded: DecodedImage,
    pub(super) scratch: Scratch,
}

/// Flow control between the consumer and the workers, in units of chunks.
#[derive(Default)]
pub(super) struct Window {
    pub(super) next_chunk: usize,
    pub(super) consumed: usize,
    /// The furthest chunk the consumer has waited for (past `Shared::soft_len` only when bad
    /// files made the epoch need more images).
    pub(super) wanted: usize,
    pub(super) stop: bool,
}

/// What the workers of one epoch share.
pub(super) struct Shared {
    pub(super) dataset: Arc<Dataset>,
    pub(super) cfg: LoaderConfig,
    pub(super) epoch: usize,
    pub(super) order: Vec<usize>,
    /// Evaluation streams end with the shard; training streams wrap around it.
    pub(super) stream_len: Option<usize>,
    /// Training: the positions the epoch's batches take when no file is bad. Workers go past it
    /// only when the consumer asks (skips), so no work is wasted after the epoch's last batch.
    pub(super) soft_len: Option<usize>,
    /// Positions per work chunk.
    pub(super) chunk: usize,
    /// Chunks the workers may run ahead of the consumer.
    pub(super) window: usize,
    /// Batches of a whole (training) epoch.
    pub(super) total_batches: usize,
    pub(super) state: Mutex<Window>,
    pub(super) wake: Condvar,
    pub(super) warned: Arc<Mutex<HashSet<usize>>>,
    pub(super) stats: Arc<Stats>,
    /// Chunk pixel buffers the consumer has finished with, and idle worker states.
    pub(super) reuse: Arc<Reuse>,
    pub(super) batch_pool: Arc<Mutex<super::BatchPool>>,
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
        crate::data::transform::eval_resize(self.cfg.image_size, self.cfg.crop_pct)
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

pub(super) fn worker(shared: &Shared, tx: &Sender<(usize, Chunk)>) {
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
    pub(super) shared: Arc<Shared>,
    pub(super) rx: Receiver<(usize, Chunk)>,
    pub(super) workers: Vec<JoinHandle<()>>,
    /// Chunks received but not yet consumed, by chunk number, with the next item's slot.
    pub(super) pending: BTreeMap<usize, (Chunk, usize)>,
    /// Next stream position to consume.
    pub(super) position: usize,
    /// Training batches still to hand out.
    pub(super) batches_left: usize,
    pub(super) skipped: usize,
    /// Good images since the stream last passed a shard boundary; guards a shard of only bad
    /// files from looping forever.
    pub(super) good_since_wrap: usize,
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
    /// are normalised or copied into `dst` (skipped when `None`). `None`: stream over.
    pub(super) fn next_item(&mut self, dst: Option<Slot>) -> Option<Item> {
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
            let n = sh.cfg.image_size * sh.cfg.image_size * 3;
            let src = &chunk.pixels[*i * n..(*i + 1) * n];
            match dst {
                Slot::F32(dst) => normalize_u8_into(src, dst, &sh.cfg.normalization),
                Slot::U8(dst) => dst.copy_from_slice(src),
            }
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

/// Where a good item's pixels go: normalised into an f32 batch, or copied into a u8 one.
pub(super) enum Slot<'a> {
    F32(&'a mut [f32]),
    U8(&'a mut [u8]),
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
        let (mut images, mut bytes) = (vec![], vec![]);
        {
            let mut pool = self.shared.batch_pool.lock().unwrap();
            if cfg.u8_batches {
                bytes = pool
                    .1
                    .pop()
                    .filter(|v| v.len() == b * pixels)
                    .unwrap_or_default();
                bytes.resize(b * pixels, 0);
            } else {
                images = pool
                    .0
                    .pop()
                    .filter(|v| v.len() == b * pixels)
                    .unwrap_or_default();
                images.resize(b * pixels, 0.0);
            }
        }
        add_ns(&self.shared.stats.pack_ns, t);
        let mut batch = Batch {
            images,
            pixels: bytes,
            norm: cfg.normalization,
            labels: vec![0; b],
            indices: Vec::with_capacity(b),
            len: 0,
            skipped: 0,
        };
        while batch.len < b {
            let range = batch.len * pixels..(batch.len + 1) * pixels;
            let slot = if batch.pixels.is_empty() {
                Slot::F32(&mut batch.images[range])
            } else {
                Slot::U8(&mut batch.pixels[range])
            };
            let Some(item) = self.next_item(Some(slot)) else {
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
        if batch.pixels.is_empty() {
            batch.images[batch.len * pixels..].fill(0.0);
        } else {
            batch.pixels[batch.len * pixels..].fill(0);
        }
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
