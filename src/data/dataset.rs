//! `Dataset`: one interface over an image folder and a packed file.

use super::decode::{decode_image, DecodedImage};
use super::folder::ImageFolder;
use super::packed::{self, PackedFile};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// A labelled image dataset, opened from a folder or a packed file.
#[derive(Debug)]
pub enum Dataset {
    Folder(ImageFolder),
    Packed(PackedFile),
}

impl Dataset {
    /// Opens `path`: a folder is read as `path/<class>/<image>`, a file must be a packed dataset.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("dataset path {} does not exist", path.display());
        }
        if path.is_dir() {
            return Ok(Self::Folder(ImageFolder::open(path)?));
        }
        if !packed::has_magic(path) {
            bail!(
                "dataset path {} is neither a folder nor a packed dataset (make one with `inception-engine pack`)",
                path.display()
            );
        }
        let p = PackedFile::open(path)?;
        if p.is_empty() {
            bail!("packed dataset {} holds no images", path.display());
        }
        Ok(Self::Packed(p))
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Folder(f) => f.len(),
            Self::Packed(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class names; label `k` is `classes()[k]`.
    pub fn classes(&self) -> &[String] {
        match self {
            Self::Folder(f) => f.classes(),
            Self::Packed(p) => p.classes(),
        }
    }

    pub fn label(&self, i: usize) -> u32 {
        match self {
            Self::Folder(f) => f.label(i),
            Self::Packed(p) => p.label(i),
        }
    }

    /// Decodes image `i` to RGB u8. Errors name the image (see [`Dataset::describe`]).
    pub fn read(&self, i: usize) -> Result<DecodedImage> {
        let decoded = match self {
            Self::Folder(f) => f.read_bytes(i).and_then(|b| decode_image(&b)),
            Self::Packed(p) => decode_image(p.bytes(i)),
        };
        decoded.with_context(|| self.describe(i))
    }

    /// The encoded bytes of image `i`: read from its file, or borrowed from the packed map.
    pub fn bytes(&self, i: usize) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Self::Folder(f) => f.read_bytes(i).map(std::borrow::Cow::Owned),
            Self::Packed(p) => Ok(std::borrow::Cow::Borrowed(p.bytes(i))),
        }
        .with_context(|| self.describe(i))
    }

    /// A human name for image `i`, for warnings: its path, or its place in the packed file.
    pub fn describe(&self, i: usize) -> String {
        match self {
            Self::Folder(f) => f.path(i).display().to_string(),
            Self::Packed(p) => format!("{} image #{i}", p.path().display()),
        }
    }
}
