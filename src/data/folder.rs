//! The ImageFolder layout: `root/<class>/<image>`, labels = class folder index in sorted order.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// File extensions read as images (compared case-insensitively). Anything else is ignored, so
/// stray text files or thumbnails databases in a class folder do no harm.
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// An image folder scanned once at open time: the file list is fixed afterwards.
#[derive(Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    /// (path, label), grouped by class in class order, files sorted by path within a class.
    files: Vec<(PathBuf, u32)>,
}

impl ImageFolder {
    /// Scans `root`. Errors name the path when it is missing, empty, has no class subfolders or
    /// holds no images.
    pub fn open(root: &Path) -> Result<Self> {
        let class_dirs = class_folders(root)?;
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut files = Vec::new();
        for (label, dir) in class_dirs.iter().enumerate() {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            classes.push(name.into_owned());
            let mut images = Vec::new();
            collect_images(dir, &mut images)?;
            images.sort();
            files.extend(images.into_iter().map(|p| (p, label as u32)));
        }
        if files.is_empty() {
            bail!(
                "no images (.jpg, .jpeg, .png) in the {} class folders of {}",
                classes.len(),
                root.display()
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            files,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn label(&self, i: usize) -> u32 {
        self.files[i].1
    }

    pub fn path(&self, i: usize) -> &Path {
        &self.files[i].0
    }

    /// The encoded bytes of image `i`.
    pub fn read_bytes(&self, i: usize) -> Result<Vec<u8>> {
        let path = self.path(i);
        fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn has_image_extension(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// The visible entries of a directory, sorted by name (byte order, like Python's `sorted`).
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if !is_hidden(&path) {
            entries.push(path);
        }
    }
    entries.sort();
    Ok(entries)
}

/// The class subfolders of `root`, sorted. Empty class folders still count as classes so that a
/// validation split missing a class keeps the same label ids as its training split.
fn class_folders(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.exists() {
        bail!("dataset path {} does not exist", root.display());
    }
    if !root.is_dir() {
        bail!("dataset path {} is not a folder", root.display());
    }
    let entries = sorted_entries(root)?;
    if entries.is_empty() {
        bail!("dataset folder {} is empty", root.display());
    }
    let dirs: Vec<PathBuf> = entries.into_iter().filter(|p| p.is_dir()).collect();
    if dirs.is_empty() {
        bail!(
            "dataset folder {} has no class subfolders (expected {}/<class>/<image>)",
            root.display(),
            root.display()
        );
    }
    Ok(dirs)
}

/// Adds the image files under `dir` (recursively, like torchvision's ImageFolder) to `out`.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}
