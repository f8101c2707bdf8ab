//! Image data: ImageFolder and packed files, decoding, transforms, loader threads.
//!
//! - [`Dataset`] opens either an ImageFolder tree (`root/<class>/<image>`) or a file written by
//!   `inception-engine pack`, and decodes image `i` to RGB u8.
//! - [`transform`] turns a decoded image into a normalised f32 NHWC tensor (training
//!   augmentation or evaluation resize + centre crop) at any square size: the f32 reference, and
//!   the u8 versions the loader runs (SIMD resize into the image's slot, fused flip and jitter,
//!   normalised once when the batch is packed).
//! - [`Decoder`] decodes into a reused buffer, JPEGs through libjpeg-turbo when it is installed
//!   (at 1/2, 1/4 or 1/8 scale when the crop allows) or zune-jpeg.
//! - [`Loader`] runs the transforms on background threads and hands out batches in an order that
//!   depends only on (seed, epoch), never on thread count or timing.

mod dataset;
mod decode;
mod fast;
mod folder;
mod loader;
pub mod packed;
pub mod transform;

pub use dataset::Dataset;
pub use decode::{decode_image, DecodedImage, Decoder, ImageHeader, JpegBackend};
pub use folder::ImageFolder;
pub use loader::{Batch, Epoch, EpochPosition, Loader, LoaderConfig, StageTimes};
pub use packed::PackedFile;
pub use transform::{AugmentConfig, Normalization, MEAN, STD};

use std::path::PathBuf;

/// The bundled demo dataset's folder (`data/fashion-mnist-mini`, holding `train/` and `val/`):
/// relative to the working directory when run from a checkout, else where this crate was built.
pub fn bundled_dataset() -> Option<PathBuf> {
    let relative = PathBuf::from("data/fashion-mnist-mini");
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&relative);
    [relative, built]
        .into_iter()
        .find(|p| p.join("train").is_dir() && p.join("val").is_dir())
}
