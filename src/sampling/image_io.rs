//! Images between tensors and PNG files.

use std::io::{BufRead, Cursor, Seek};
use std::path::Path;

use candle_core::{DType, Tensor};
use image::{ImageReader, Limits};

use crate::weights::store::tmp_path;
use crate::{Error, Result};

/// Writes one `[H, W, 3]` image with values in [0, 1] as an 8-bit PNG, rounding as diffusers'
/// `numpy_to_pil` does; written to a temporary file and renamed, so no partial file is left.
pub fn save_png(image_hwc: &Tensor, path: &Path) -> Result<()> {
    let (h, w, c) = image_hwc.dims3()?;
    if c != 3 {
        return Err(Error::input("image", format!("expected 3 channels, got {c}")));
    }
    let data: Vec<f32> = image_hwc.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = data.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let buf = image::RgbImage::from_raw(w as u32, h as u32, bytes).expect("buffer has h*w*3 bytes");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = tmp_path(path);
    let r = buf
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The largest width or height an image may declare to be decoded, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// The most memory the decoder may allocate for one image (1 GiB).
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Decodes an image with explicit limits: its declared size is read from the header first, so
/// a small file declaring 20000x20000 pixels fails at once, naming `what` (the file or record),
/// instead of allocating gigabytes. `open` gives a fresh reader (the header and the decode each
/// read the input from its start).
fn decode_limited<R: BufRead + Seek>(
    open: impl Fn() -> std::io::Result<ImageReader<R>>,
    what: &str,
) -> Result<image::DynamicImage> {
    let reader = || -> Result<ImageReader<R>> {
        open()
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| Error::input(what, e.to_string()))
    };
    let cannot = |e: image::ImageError| Error::input(what, format!("cannot decode image: {e}"));
    let (w, h) = reader()?.into_dimensions().map_err(cannot)?;
    if w == 0 || h == 0 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(Error::input(
            what,
            format!("the image declares {w}x{h} pixels; images from 1x1 to {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} are read"),
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut r = reader()?;
    r.limits(limits);
    r.decode().map_err(cannot)
}

/// Decodes image bytes (PNG or JPEG) within [`MAX_IMAGE_SIDE`] and [`MAX_DECODE_BYTES`];
/// errors name `what` (a file, a record's column).
pub fn decode_image_bytes(bytes: &[u8], what: &str) -> Result<image::DynamicImage> {
    decode_limited(|| Ok(ImageReader::new(Cursor::new(bytes))), what)
}

/// Reads an image file (PNG or JPEG) within [`MAX_IMAGE_SIDE`] and [`MAX_DECODE_BYTES`].
pub fn read_image_file(path: &Path) -> Result<image::DynamicImage> {
    if path.is_dir() {
        return Err(Error::input(path.display().to_string(), "a folder, not an image file"));
    }
    let what = path.display().to_string();
    decode_limited(|| ImageReader::open(path), &what)
}

/// Reads a PNG or JPEG as `[H, W, 3]` f32 in [0, 1] (see [`read_image_file`] for the limits).
pub fn load_image(path: &Path) -> Result<Tensor> {
    let img = read_image_file(path)?.to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.into_raw().into_iter().map(|b| b as f32 / 255.0).collect();
    Ok(Tensor::from_vec(
        data,
        (h as usize, w as usize, 3),
        &candle_core::Device::Cpu,
    )?)
}
