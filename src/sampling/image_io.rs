//! Images between tensors and PNG files.

use std::path::Path;

use candle_core::{DType, Tensor};

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

/// Reads a PNG (or any format the `image` crate was built with) as `[H, W, 3]` f32 in [0, 1].
pub fn load_image(path: &Path) -> Result<Tensor> {
    let img = image::open(path)
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.into_raw().into_iter().map(|b| b as f32 / 255.0).collect();
    Ok(Tensor::from_vec(
        data,
        (h as usize, w as usize, 3),
        &candle_core::Device::Cpu,
    )?)
}
