//! Image data: ImageFolder and packed files, decoding, transforms, loader threads.
//!
//! - [`Dataset`] opens either an ImageFolder tree (`root/<class>/<image>`) or a file written by
//!   `inception-engine pack`, and decodes image `i` to RGB u8.
//! - [`transform`] turns a decoded image into a normalised f32 NHWC tensor (training
//!   augmentation or evaluation resize + centre crop) at any square size.
//! - [`Loader`] runs the transforms on background threads and hands out batches in an order that
//!   depends only on (seed, epoch), never on thread count or timing.

mod dataset;
mod decode;
mod folder;
mod loader;
pub mod packed;
pub mod transform;

pub use dataset::Dataset;
pub use decode::{decode_image, DecodedImage};
pub use folder::ImageFolder;
pub use loader::{Batch, Epoch, Loader, LoaderConfig};
pub use packed::PackedFile;
pub use transform::{AugmentConfig, MEAN, STD};
