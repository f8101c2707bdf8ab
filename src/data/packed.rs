//! The packed dataset file written by `inception-engine pack` and read through a memory map.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic        8 bytes  b"IEPACK\0\0"
//! version      u32      1, or 2 when written with `--max-side`
//! num_classes  u32
//! num_images   u64
//! max_side     u32      version 2 only: the N of `pack --max-side N`
//! reserved     u32      version 2 only: 0
//! classes      num_classes x (u32 byte length, UTF-8 name)
//! padding      zero bytes up to a multiple of 8
//! index        num_images x (u32 label, u32 reserved = 0, u64 offset, u64 length)
//! data         the encoded image bytes (JPEG or PNG, exactly as they were on disk)
//! ```
//!
//! Offsets are from the start of the file. Images stay encoded: the file is about as large as the
//! folder and decoding happens in the loader threads, as for a folder. With `--max-side N`, an
//! image whose shorter side exceeds N is stored resized so that its shorter side is N
//! (antialiased bilinear) and re-encoded (JPEG at the given quality, PNG stays PNG); smaller
//! images are stored as they were.

use super::folder::ImageFolder;
use anyhow::{ensure, Context, Result};
use memmap2::Mmap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"IEPACK\0\0";
/// The version written without `--max-side` (and read by older builds).
pub const VERSION: u32 = 1;
/// The version that records `--max-side`.
pub const VERSION_MAX_SIDE: u32 = 2;
const INDEX_ENTRY_BYTES: usize = 24;

/// One image's place in the data section.
#[derive(Clone, Copy, Debug)]
struct Entry {
    label: u32,
    offset: u64,
    length: u64,
}

/// A packed dataset file, memory-mapped read-only.
pub struct PackedFile {
    path: PathBuf,
    map: Mmap,
    classes: Vec<String>,
    entries: Vec<Entry>,
    max_side: Option<u32>,
}

impl std::fmt::Debug for PackedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedFile")
            .field("path", &self.path)
            .field("classes", &self.classes.len())
            .field("images", &self.entries.len())
            .finish()
    }
}

/// True when the file at `path` starts with the packed magic.
pub fn has_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == MAGIC
}

impl PackedFile {
    /// Maps and validates `path`; a truncated or corrupt header or index is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; packed files are written once (atomically, by rename)
        // and not modified while training reads them.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (classes, entries, max_side) = parse(&map)
            .with_context(|| format!("{} is not a valid packed dataset", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            classes,
            entries,
            max_side,
        })
    }

    /// The N of `pack --max-side N` this file was written with (`None`: images as they were).
    pub fn max_side(&self) -> Option<u32> {
        self.max_side
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn label(&self, i: usize) -> u32 {
        self.entries[i].label
    }

    /// The encoded bytes of image `i`, borrowed from the map.
    pub fn bytes(&self, i: usize) -> &[u8] {
        let e = self.entries[i];
        &self.map[e.offset as usize..(e.offset + e.length) as usize]
    }
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.with_context(|| format!("truncated at byte {}", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

type Parsed = (Vec<String>, Vec<Entry>, Option<u32>);

fn parse(bytes: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { bytes, pos: 0 };
    ensure!(
        c.take(8)? == MAGIC,
        "bad magic (not written by `inception-engine pack`)"
    );
    let version = c.u32()?;
    ensure!(
        version == VERSION || version == VERSION_MAX_SIDE,
        "unsupported version {version} (this build reads {VERSION} and {VERSION_MAX_SIDE})"
    );
    let num_classes = c.u32()? as usize;
    let num_images = c.u64()?;
    let max_side = if version == VERSION_MAX_SIDE {
        let n = c.u32()?;
        c.u32()?; // reserved
        Some(n)
    } else {
        None
    };
    let mut classes = Vec::with_capacity(num_classes.min(1 << 16));
    for _ in 0..num_classes {
        let len = c.u32()? as usize;
        let name = std::str::from_utf8(c.take(len)?).context("class name is not UTF-8")?;
        classes.push(name.to_string());
    }
    c.take(c.pos.next_multiple_of(8) - c.pos)?;
    // Check the index fits before allocating for it, so a corrupt count cannot exhaust memory.
    let index_bytes = (num_images as usize).checked_mul(INDEX_ENTRY_BYTES);
    ensure!(
        index_bytes.is_some_and(|n| n <= bytes.len() - c.pos),
        "index of {num_images} images runs past the end of the file (truncated?)"
    );
    let data_start = (c.pos + INDEX_ENTRY_BYTES * num_images as usize) as u64;
    let mut entries = Vec::with_capacity(num_images as usize);
    for i in 0..num_images as usize {
        let e = Entry {
            label: c.u32()?,
            offset: {
                c.u32()?; // reserved
                c.u64()?
            },
            length: c.u64()?,
        };
        ensure!(
            (e.label as usize) < num_classes,
            "image {i} has label {} but only {num_classes} classes",
            e.label
        );
        let end = e.offset.checked_add(e.length);
        ensure!(
            e.offset >= data_start && end.is_some_and(|end| end <= bytes.len() as u64),
            "image {i} (bytes {}..+{}) lies outside the file ({} bytes; truncated?)",
            e.offset,
            e.length,
            bytes.len()
        );
        entries.push(e);
    }
    Ok((classes, entries, max_side))
}

/// How `pack` stores the images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackOptions {
    /// Store images whose shorter side exceeds N resized to N (and re-encoded).
    pub max_side: Option<u32>,
    /// JPEG quality of re-encoded images (1..=100).
    pub quality: u8,
}

/// Writes the images of `folder` into a packed file at `out`, as they are on disk. The file
/// appears atomically: it is written to `<out>.tmp`, synced, then renamed, so a crash never
/// leaves a half-written pack. Returns the number of images written.
pub fn write_packed(folder: &ImageFolder, out: &Path) -> Result<usize> {
    write_packed_with(folder, out, PackOptions::default()).map(|s| s.images)
}

/// What [`write_packed_with`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackSummary {
    pub images: usize,
    /// Images stored resized (shorter side above `max_side`).
    pub resized: usize,
}

/// [`write_packed`] with options (`--max-side`).
pub fn write_packed_with(
    folder: &ImageFolder,
    out: &Path,
    opts: PackOptions,
) -> Result<PackSummary> {
    if let Some(n) = opts.max_side {
        ensure!(n >= 1, "--max-side must be at least 1");
    }
    ensure!(
        (1..=100).contains(&opts.quality) || opts.max_side.is_none(),
        "JPEG quality must be in 1..=100"
    );
    let tmp = tmp_path(out);
    let result = write_to(folder, &tmp, opts);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let summary = result?;
    fs::rename(&tmp, out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
    Ok(summary)
}

fn tmp_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// The bytes to store for one image: as on disk, or resized and re-encoded when its shorter
/// side exceeds `max_side`. The flag says whether it was resized.
pub fn stored_bytes(bytes: Vec<u8>, opts: PackOptions) -> Result<(Vec<u8>, bool)> {
    let Some(max_side) = opts.max_side.map(|n| n as usize) else {
        return Ok((bytes, false));
    };
    // A file that does not decode is stored as it is: the loader skips it with a warning, as it
    // would in the folder.
    let Ok(format) = image::guess_format(&bytes) else {
        return Ok((bytes, false));
    };
    let Ok(img) = super::decode::decode_image(&bytes) else {
        return Ok((bytes, false));
    };
    let short = img.width.min(img.height);
    if short <= max_side {
        return Ok((bytes, false));
    }
    // The shorter side becomes exactly N; the longer keeps the aspect ratio (rounded).
    let scale = max_side as f64 / short as f64;
    let (w, h) = if img.width <= img.height {
        (
            max_side,
            ((img.height as f64 * scale).round() as usize).max(1),
        )
    } else {
        (
            ((img.width as f64 * scale).round() as usize).max(1),
            max_side,
        )
    };
    let resized = resize_whole(&img, w, h)?;
    let mut out = Vec::new();
    let buf = image::RgbImage::from_raw(w as u32, h as u32, resized).context("resized image")?;
    if format == image::ImageFormat::Png {
        buf.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .context("cannot encode PNG")?;
    } else {
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, opts.quality);
        buf.write_with_encoder(enc).context("cannot encode JPEG")?;
    }
    Ok((out, true))
}

/// The whole image resized to `w` x `h` (antialiased bilinear, as the loader's resize).
fn resize_whole(img: &super::decode::DecodedImage, w: usize, h: usize) -> Result<Vec<u8>> {
    use fast_image_resize as fir;
    let src = fir::images::ImageRef::new(
        img.width as u32,
        img.height as u32,
        &img.pixels,
        fir::PixelType::U8x3,
    )?;
    let mut dst = fir::images::Image::new(w as u32, h as u32, fir::PixelType::U8x3);
    let opts = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
    fir::Resizer::new().resize(&src, &mut dst, &opts)?;
    Ok(dst.into_vec())
}

fn write_to(folder: &ImageFolder, path: &Path, opts: PackOptions) -> Result<PackSummary> {
    use rayon::prelude::*;
    use std::io::{Seek, SeekFrom};
    // The index precedes the data but the stored sizes are only known once the images are
    // (re-)encoded: write a zero index, the data, then the index in its place.
    let header = header_bytes(folder.classes(), folder.len(), opts.max_side);
    let index_start = header.len() as u64;
    let mut offset = index_start + (INDEX_ENTRY_BYTES * folder.len()) as u64;
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::new(file);
    w.write_all(&header)?;
    w.write_all(&vec![0u8; INDEX_ENTRY_BYTES * folder.len()])?;
    let mut index = Vec::with_capacity(INDEX_ENTRY_BYTES * folder.len());
    let mut resized = 0;
    // Re-encoding runs on every core, a block of images at a time, written in order.
    let ids: Vec<usize> = (0..folder.len()).collect();
    for block in ids.chunks(256) {
        let stored: Vec<Result<(Vec<u8>, bool)>> = block
            .par_iter()
            .map(|&i| {
                let bytes = folder.read_bytes(i)?;
                stored_bytes(bytes, opts).with_context(|| folder.path(i).display().to_string())
            })
            .collect();
        for (&i, s) in block.iter().zip(stored) {
            let (bytes, was_resized) = s?;
            resized += was_resized as usize;
            index.extend_from_slice(&folder.label(i).to_le_bytes());
            index.extend_from_slice(&0u32.to_le_bytes());
            index.extend_from_slice(&offset.to_le_bytes());
            index.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            w.write_all(&bytes)?;
            offset += bytes.len() as u64;
        }
    }
    w.seek(SeekFrom::Start(index_start))?;
    w.write_all(&index)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(PackSummary {
        images: folder.len(),
        resized,
    })
}

/// Magic, version, counts (and `max_side`) and class names, padded to a multiple of 8 bytes.
fn header_bytes(classes: &[String], num_images: usize, max_side: Option<u32>) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(MAGIC);
    let version = if max_side.is_some() {
        VERSION_MAX_SIDE
    } else {
        VERSION
    };
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&(classes.len() as u32).to_le_bytes());
    h.extend_from_slice(&(num_images as u64).to_le_bytes());
    if let Some(n) = max_side {
        h.extend_from_slice(&n.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
    }
    for name in classes {
        h.extend_from_slice(&(name.len() as u32).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
    }
    h.resize(h.len().next_multiple_of(8), 0);
    h
}
