//! Image data: ImageFolder and packed files, decoding, transforms, loader threads.
