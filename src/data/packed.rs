//! The packed dataset file written by `inception-engine pack` and read through a memory map.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic        8 bytes  b"IEPACK\0\0"
//! version      u32      1
//! num_classes  u32
//! num_images   u64
//! classes      num_classes x (u32 byte length, UTF-8 name)
//! padding      zero bytes up to a multiple of 8
//! index        num_images x (u32 label, u32 reserved = 0, u64 offset, u64 length)
//! data         the encoded image bytes (JPEG or PNG, exactly as they were on disk)
//! ```
//!
//! Offsets are from the start of the file. Images stay encoded: the file is about as large as the
//! folder and decoding happens in the loader threads, as for a folder.

use super::folder::ImageFolder;
use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"IEPACK\0\0";
pub const VERSION: u32 = 1;
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
        let (classes, entries) = parse(&map)
            .with_context(|| format!("{} is not a valid packed dataset", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            classes,
            entries,
        })
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

fn parse(bytes: &[u8]) -> Result<(Vec<String>, Vec<Entry>)> {
    let mut c = Cursor { bytes, pos: 0 };
    ensure!(
        c.take(8)? == MAGIC,
        "bad magic (not written by `inception-engine pack`)"
    );
    let version = c.u32()?;
    ensure!(
        version == VERSION,
        "unsupported version {version} (this build reads {VERSION})"
    );
    let num_classes = c.u32()? as usize;
    let num_images = c.u64()?;
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
    Ok((classes, entries))
}

/// Writes the images of `folder` into a packed file at `out`. The file appears atomically: it is
/// written to `<out>.tmp`, synced, then renamed, so a crash never leaves a half-written pack.
/// Returns the number of images written.
pub fn write_packed(folder: &ImageFolder, out: &Path) -> Result<usize> {
    let tmp = tmp_path(out);
    let result = write_to(folder, &tmp);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fs::rename(&tmp, out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
    Ok(folder.len())
}

fn tmp_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn write_to(folder: &ImageFolder, path: &Path) -> Result<()> {
    // Sizes come from the file system first so the index can precede the data.
    let mut lengths = Vec::with_capacity(folder.len());
    for i in 0..folder.len() {
        let p = folder.path(i);
        let meta = fs::metadata(p).with_context(|| format!("cannot stat {}", p.display()))?;
        lengths.push(meta.len());
    }
    let header = header_bytes(folder.classes(), folder.len());
    let mut offset = (header.len() + INDEX_ENTRY_BYTES * folder.len()) as u64;
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::new(file);
    w.write_all(&header)?;
    for (i, &len) in lengths.iter().enumerate() {
        w.write_all(&folder.label(i).to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        w.write_all(&offset.to_le_bytes())?;
        w.write_all(&len.to_le_bytes())?;
        offset += len;
    }
    for (i, &len) in lengths.iter().enumerate() {
        let bytes = folder.read_bytes(i)?;
        if bytes.len() as u64 != len {
            bail!("{} changed size while packing", folder.path(i).display());
        }
        w.write_all(&bytes)?;
    }
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

/// Magic, version, counts and class names, padded to a multiple of 8 bytes.
fn header_bytes(classes: &[String], num_images: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(classes.len() as u32).to_le_bytes());
    h.extend_from_slice(&(num_images as u64).to_le_bytes());
    for name in classes {
        h.extend_from_slice(&(name.len() as u32).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
    }
    h.resize(h.len().next_multiple_of(8), 0);
    h
}
