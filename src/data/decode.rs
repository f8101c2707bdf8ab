//! Decoding encoded image bytes (JPEG baseline/progressive, PNG) to RGB u8.

use anyhow::{bail, ensure, Context, Result};

/// A decoded image: `height` rows of `width` RGB pixels, u8, channel fastest (HWC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes.
    pub pixels: Vec<u8>,
}

impl DecodedImage {
    /// The RGB triple at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// Decodes JPEG or PNG bytes. The format comes from the bytes' signature, not the file name, so a
/// mis-named file still decodes. Grey becomes three equal channels; alpha is dropped.
pub fn decode_image(bytes: &[u8]) -> Result<DecodedImage> {
    let format = image::guess_format(bytes).context("not a recognised image format")?;
    if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        bail!("unsupported image format {format:?} (only JPEG and PNG)");
    }
    let img = image::load_from_memory_with_format(bytes, format).context("cannot decode image")?;
    let rgb = img.into_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    if width == 0 || height == 0 {
        bail!("image has zero size ({width}x{height})");
    }
    Ok(DecodedImage {
        width,
        height,
        pixels: rgb.into_raw(),
    })
}

/// Which JPEG decoder a [`Decoder`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum JpegBackend {
    /// libjpeg-turbo when its library loads (it is faster on both kinds of JPEG and can decode at
    /// 1/2, 1/4 and 1/8 scale), else zune-jpeg.
    #[default]
    Auto,
    /// zune-jpeg (pure Rust, always available, full scale only).
    Zune,
    /// libjpeg-turbo's TurboJPEG library, opened at run time (`libturbojpeg.so.0`); an error
    /// when it cannot be loaded.
    Turbo,
}

/// A reusable decoder for one loader thread: the decoded image goes into a caller-owned buffer,
/// so steady-state decoding allocates nothing, and JPEGs may be decoded at a reduced scale
/// (libjpeg-turbo's DCT scaling) when the consumer only needs a smaller image.
pub struct Decoder {
    turbo: Option<turbo::Handle>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("turbo", &self.turbo.is_some())
            .finish()
    }
}

/// The size of an encoded image without decoding its pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub width: usize,
    pub height: usize,
    /// JPEG (may be decoded at a reduced scale) rather than PNG.
    pub jpeg: bool,
}

impl Decoder {
    /// A decoder using `backend`; `Turbo` fails when libjpeg-turbo cannot be loaded.
    pub fn new(backend: JpegBackend) -> Result<Self> {
        let turbo = match backend {
            JpegBackend::Zune => None,
            JpegBackend::Auto => turbo::Handle::new().ok(),
            JpegBackend::Turbo => Some(turbo::Handle::new()?),
        };
        Ok(Self { turbo })
    }

    /// True when JPEGs go through libjpeg-turbo (and can be decoded at reduced scale).
    pub fn uses_turbo(&self) -> bool {
        self.turbo.is_some()
    }

    /// The image's size from its header alone.
    pub fn header(&mut self, bytes: &[u8]) -> Result<ImageHeader> {
        let format = image::guess_format(bytes).context("not a recognised image format")?;
        let (width, height, jpeg) = match format {
            image::ImageFormat::Jpeg => {
                let turbo = self.turbo.as_mut().and_then(|t| t.header(bytes).ok());
                let (w, h) = match turbo {
                    Some(dims) => dims,
                    None => {
                        let mut d = zune_jpeg::JpegDecoder::new_with_options(
                            zune_core::bytestream::ZCursor::new(bytes),
                            zune_options(),
                        );
                        d.decode_headers()
                            .map_err(|e| anyhow::anyhow!("cannot decode image: {e:?}"))?;
                        let (w, h) = d.dimensions().context("JPEG without dimensions")?;
                        (w, h)
                    }
                };
                (w, h, true)
            }
            image::ImageFormat::Png => {
                let dec = image::codecs::png::PngDecoder::new(std::io::Cursor::new(bytes))
                    .context("cannot decode image")?;
                let (w, h) = image::ImageDecoder::dimensions(&dec);
                (w as usize, h as usize, false)
            }
            other => bail!("unsupported image format {other:?} (only JPEG and PNG)"),
        };
        if width == 0 || height == 0 {
            bail!("image has zero size ({width}x{height})");
        }
        Ok(ImageHeader {
            width,
            height,
            jpeg,
        })
    }

    /// Decodes `bytes` into `out` (its buffer reused), at 1/`denom` scale where possible:
    /// `denom` is 1, 2, 4 or 8 and only applies to JPEGs decoded by libjpeg-turbo (each side
    /// becomes `ceil(side / denom)`). Returns the scale actually used (1 when not scaled).
    pub fn decode_into(
        &mut self,
        bytes: &[u8],
        denom: usize,
        out: &mut DecodedImage,
    ) -> Result<usize> {
        let format = image::guess_format(bytes).context("not a recognised image format")?;
        if format == image::ImageFormat::Jpeg {
            if let Some(t) = self.turbo.as_mut() {
                if let Ok(used) = t.decode_into(bytes, denom, out) {
                    return Ok(used);
                }
                // Colour spaces TurboJPEG cannot turn into RGB (CMYK) and damaged files the
                // other decoders may still read fall through to them.
            }
            if zune_decode_into(bytes, out).is_ok() {
                return Ok(1);
            }
        }
        *out = decode_image(bytes)?;
        Ok(1)
    }
}

fn zune_options() -> zune_core::options::DecoderOptions {
    zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
}

/// Sets `out` to `width` x `height` without clearing what its buffer held.
fn reshape(out: &mut DecodedImage, width: usize, height: usize) {
    let n = width * height * 3;
    out.pixels.truncate(n);
    out.pixels.resize(n, 0);
    out.width = width;
    out.height = height;
}

/// zune-jpeg straight into `out` for YCbCr and RGB JPEGs; other colour spaces are an error here
/// (the caller falls back to [`decode_image`]).
fn zune_decode_into(bytes: &[u8], out: &mut DecodedImage) -> Result<()> {
    use zune_core::colorspace::ColorSpace;
    let mut d = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        zune_options(),
    );
    d.decode_headers()
        .map_err(|e| anyhow::anyhow!("cannot decode image: {e:?}"))?;
    ensure!(
        matches!(
            d.input_colorspace(),
            Some(ColorSpace::YCbCr | ColorSpace::RGB)
        ),
        "colour space left to the image crate"
    );
    d.set_options(d.options().jpeg_set_out_colorspace(ColorSpace::RGB));
    let (w, h) = d.dimensions().context("JPEG without dimensions")?;
    ensure!(w > 0 && h > 0, "image has zero size ({w}x{h})");
    reshape(out, w, h);
    d.decode_into(&mut out.pixels)
        .map_err(|e| anyhow::anyhow!("cannot decode image: {e:?}"))
}

/// The few TurboJPEG 2.x calls the loader needs, resolved from `libturbojpeg.so.0` at run time,
/// so the engine builds and runs without the library (and falls back to zune-jpeg).
mod turbo {
    use super::{reshape, DecodedImage};
    use anyhow::{bail, Context, Result};
    use std::ffi::{c_char, c_int, c_ulong, c_void, CStr};
    use std::sync::OnceLock;

    type InitDecompress = unsafe extern "C" fn() -> *mut c_void;
    type DecompressHeader3 = unsafe extern "C" fn(
        *mut c_void,
        *const u8,
        c_ulong,
        *mut c_int,
        *mut c_int,
        *mut c_int,
        *mut c_int,
    ) -> c_int;
    type Decompress2 = unsafe extern "C" fn(
        *mut c_void,
        *const u8,
        c_ulong,
        *mut u8,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> c_int;
    type Destroy = unsafe extern "C" fn(*mut c_void) -> c_int;
    type GetErrorStr2 = unsafe extern "C" fn(*mut c_void) -> *mut c_char;

    /// TJPF_RGB.
    const PIXEL_RGB: c_int = 0;

    struct Api {
        _lib: libloading::Library,
        init: InitDecompress,
        header: DecompressHeader3,
        decompress: Decompress2,
        destroy: Destroy,
        error: GetErrorStr2,
    }

    fn api() -> Result<&'static Api> {
        static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
        API.get_or_init(|| load().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn load() -> Result<Api> {
        let names = ["libturbojpeg.so.0", "libturbojpeg.so"];
        let lib = names
            .iter()
            // SAFETY: loading libjpeg-turbo runs no initialisers with preconditions.
            .find_map(|n| unsafe { libloading::Library::new(*n) }.ok())
            .context("libjpeg-turbo (libturbojpeg.so.0) is not installed")?;
        // SAFETY: the symbol types are TurboJPEG 2.x's documented C signatures.
        unsafe {
            let init = *lib.get::<InitDecompress>(b"tjInitDecompress\0")?;
            let header = *lib.get::<DecompressHeader3>(b"tjDecompressHeader3\0")?;
            let decompress = *lib.get::<Decompress2>(b"tjDecompress2\0")?;
            let destroy = *lib.get::<Destroy>(b"tjDestroy\0")?;
            let error = *lib.get::<GetErrorStr2>(b"tjGetErrorStr2\0")?;
            Ok(Api {
                _lib: lib,
                init,
                header,
                decompress,
                destroy,
                error,
            })
        }
    }

    /// One TurboJPEG decompressor (not shared between threads).
    pub struct Handle {
        api: &'static Api,
        h: *mut c_void,
    }

    // SAFETY: a TurboJPEG handle may move between threads; it is only used by one at a time.
    unsafe impl Send for Handle {}

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: `h` came from tjInitDecompress and is destroyed once.
            unsafe { (self.api.destroy)(self.h) };
        }
    }

    impl Handle {
        pub fn new() -> Result<Self> {
            let api = api()?;
            // SAFETY: plain constructor; null on failure.
            let h = unsafe { (api.init)() };
            if h.is_null() {
                bail!("tjInitDecompress failed");
            }
            Ok(Self { api, h })
        }

        fn error(&self) -> String {
            // SAFETY: TurboJPEG returns a NUL-terminated string owned by the handle.
            let s = unsafe { (self.api.error)(self.h) };
            if s.is_null() {
                return "unknown TurboJPEG error".into();
            }
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        }

        pub fn header(&mut self, bytes: &[u8]) -> Result<(usize, usize)> {
            let (mut w, mut h, mut sub, mut cs) = (0, 0, 0, 0);
            // SAFETY: `bytes` is valid for its length; the out-pointers are live locals.
            let rc = unsafe {
                (self.api.header)(
                    self.h,
                    bytes.as_ptr(),
                    bytes.len() as c_ulong,
                    &mut w,
                    &mut h,
                    &mut sub,
                    &mut cs,
                )
            };
            if rc != 0 || w <= 0 || h <= 0 {
                bail!("cannot read JPEG header: {}", self.error());
            }
            Ok((w as usize, h as usize))
        }

        /// Decodes at 1/`denom` scale (1, 2, 4 or 8).
        pub fn decode_into(
            &mut self,
            bytes: &[u8],
            denom: usize,
            out: &mut DecodedImage,
        ) -> Result<usize> {
            let denom = match denom {
                8.. => 8,
                4..=7 => 4,
                2..=3 => 2,
                _ => 1,
            };
            let (w, h) = self.header(bytes)?;
            let (sw, sh) = (w.div_ceil(denom), h.div_ceil(denom));
            reshape(out, sw, sh);
            // SAFETY: the destination holds `sh` rows of `sw * 3` bytes, which is what TurboJPEG
            // writes for this scaled size in RGB.
            let rc = unsafe {
                (self.api.decompress)(
                    self.h,
                    bytes.as_ptr(),
                    bytes.len() as c_ulong,
                    out.pixels.as_mut_ptr(),
                    sw as c_int,
                    (sw * 3) as c_int,
                    sh as c_int,
                    PIXEL_RGB,
                    0,
                )
            };
            if rc != 0 {
                bail!("cannot decode image: {}", self.error());
            }
            Ok(denom)
        }
    }
}
