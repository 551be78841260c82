//! PNG output for ShapeWorld images: 8-bit RGB conversion and image grids.

use std::path::Path;

use super::{IMAGE_SIZE, WorldError, check_image};

/// Width of the gutters between (and around) grid cells, in output pixels.
pub const GUTTER: usize = 2;
/// Gutter colour (dark grey, distinct from the mid-grey background).
const GUTTER_RGB: [u8; 3] = [32, 32, 32];

/// Converts a CHW `[3, 32, 32]` image in `[-1, 1]` to interleaved HWC RGB8
/// (`v ↦ round((v + 1) / 2 · 255)`, clamped; NaN becomes 0).
pub fn image_to_rgb8(image: &[f32]) -> Result<Vec<u8>, WorldError> {
    check_image(image)?;
    chw_to_rgb8(image, IMAGE_SIZE, IMAGE_SIZE)
}

/// [`image_to_rgb8`] of a CHW `[3, height, width]` image of any size.
pub fn chw_to_rgb8(image: &[f32], height: usize, width: usize) -> Result<Vec<u8>, WorldError> {
    let plane = height * width;
    if image.len() != 3 * plane {
        return Err(WorldError::InvalidInput(format!(
            "expected a CHW [3, {height}, {width}] image of {} values, got {}",
            3 * plane,
            image.len()
        )));
    }
    let mut out = vec![0u8; 3 * plane];
    for i in 0..plane {
        for c in 0..3 {
            out[3 * i + c] = to_u8(image[c * plane + i]);
        }
    }
    Ok(out)
}

#[inline]
fn to_u8(v: f32) -> u8 {
    // `as` saturates and maps NaN to 0.
    ((v + 1.0) * 0.5 * 255.0).round().clamp(0.0, 255.0) as u8
}

/// Writes `images` (each CHW `[3, 32, 32]` in `[-1, 1]`) as an RGB PNG grid
/// with `cols` columns, each image upscaled `scale`× (nearest neighbour), and
/// [`GUTTER`]-px dark gutters between and around cells. Missing cells of the
/// last row are left as gutter colour. The file is written atomically (temp
/// file in the same directory, then rename).
pub fn write_png_grid(
    path: impl AsRef<Path>,
    images: &[Vec<f32>],
    cols: usize,
    scale: usize,
) -> Result<(), WorldError> {
    let (width, height, buf) = grid_rgb8(images, cols, scale)?;
    write_atomic(path.as_ref(), &encode_rgb8(width, height, &buf)?)
}

/// The grid [`write_png_grid`] writes, as (width, height, interleaved RGB8 pixels).
pub fn grid_rgb8(
    images: &[Vec<f32>],
    cols: usize,
    scale: usize,
) -> Result<(usize, usize, Vec<u8>), WorldError> {
    if images.is_empty() {
        return Err(WorldError::InvalidInput("no images to write".into()));
    }
    if cols == 0 || !(1..=64).contains(&scale) {
        return Err(WorldError::InvalidInput(format!(
            "cols must be ≥ 1 and scale in 1..=64 (got cols={cols}, scale={scale})"
        )));
    }
    let cols = cols.min(images.len());
    let rows = images.len().div_ceil(cols);
    let cell = IMAGE_SIZE * scale;
    let width = cols * cell + (cols + 1) * GUTTER;
    let height = rows * cell + (rows + 1) * GUTTER;
    if width > 1 << 15 || height > 1 << 15 {
        return Err(WorldError::InvalidInput(format!(
            "grid of {width}x{height} px is too large"
        )));
    }
    let mut buf: Vec<u8> = GUTTER_RGB.repeat(width * height);
    for (k, img) in images.iter().enumerate() {
        let rgb = image_to_rgb8(img)?;
        let (ox, oy) = (
            GUTTER + (k % cols) * (cell + GUTTER),
            GUTTER + (k / cols) * (cell + GUTTER),
        );
        for y in 0..cell {
            let row = &rgb[(y / scale) * IMAGE_SIZE * 3..][..IMAGE_SIZE * 3];
            let dst = &mut buf[((oy + y) * width + ox) * 3..][..cell * 3];
            for x in 0..cell {
                dst[x * 3..x * 3 + 3].copy_from_slice(&row[(x / scale) * 3..(x / scale) * 3 + 3]);
            }
        }
    }
    Ok((width, height, buf))
}

/// Encodes an interleaved 8-bit RGB image (row-major, `width · height · 3` bytes) as PNG.
pub fn encode_rgb8(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>, WorldError> {
    if width == 0 || height == 0 || width > 1 << 15 || height > 1 << 15 {
        return Err(WorldError::InvalidInput(format!(
            "image of {width}x{height} px: each side must be in 1..=32768"
        )));
    }
    if rgb.len() != width * height * 3 {
        return Err(WorldError::InvalidInput(format!(
            "{width}x{height} RGB image needs {} bytes, got {}",
            width * height * 3,
            rgb.len()
        )));
    }
    let mut bytes = Vec::new();
    {
        let mut enc = ::png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(::png::ColorType::Rgb);
        enc.set_depth(::png::BitDepth::Eight);
        let fmt = |e: ::png::EncodingError| WorldError::Format(format!("png: {e}"));
        let mut writer = enc.write_header().map_err(fmt)?;
        writer.write_image_data(rgb).map_err(fmt)?;
        writer.finish().map_err(fmt)?;
    }
    Ok(bytes)
}

/// Decodes a PNG (any colour type and bit depth; the first frame of an APNG) into
/// interleaved 8-bit RGB: `(width, height, rgb)`. Alpha is composited over white.
pub fn decode_rgb8(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), WorldError> {
    let fmt = |e: ::png::DecodingError| WorldError::Format(format!("png: {e}"));
    let mut dec = ::png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(::png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().map_err(fmt)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| WorldError::Format("png: image too large".into()))?;
    let mut buf = vec![0; size];
    let info = reader.next_frame(&mut buf).map_err(fmt)?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        ::png::ColorType::Grayscale => 1,
        ::png::ColorType::GrayscaleAlpha => 2,
        ::png::ColorType::Rgb => 3,
        ::png::ColorType::Rgba => 4,
        ::png::ColorType::Indexed => {
            return Err(WorldError::Format("png: palette was not expanded".into()));
        }
    };
    let over_white = |v: u8, a: u8| ((v as u32 * a as u32 + 255 * (255 - a as u32)) / 255) as u8;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for px in buf[..info.buffer_size()].chunks_exact(channels).take(w * h) {
        let (r, g, b, a) = match *px {
            [v] => (v, v, v, 255),
            [v, a] => (v, v, v, a),
            [r, g, b] => (r, g, b, 255),
            [r, g, b, a] => (r, g, b, a),
            _ => unreachable!("chunks of 1 to 4 bytes"),
        };
        rgb.extend_from_slice(&[over_white(r, a), over_white(g, a), over_white(b, a)]);
    }
    if rgb.len() != w * h * 3 {
        return Err(WorldError::Format("png: truncated image data".into()));
    }
    Ok((w, h, rgb))
}

/// Writes `bytes` to `path` atomically with the engine's crash-safe writer.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WorldError> {
    runner::fsutil::write_atomic(path, bytes)
        .map_err(|e| WorldError::Io(std::io::Error::other(format!("{e:#}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{IMAGE_LEN, Target, render};
    use rand::SeedableRng;

    #[test]
    fn should_write_a_decodable_grid() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let t: Target = serde_json::from_str(
            r#"{"objects":[{"shape":"circle","color":"red","count":1}],"relation":null}"#,
        )
        .unwrap();
        let mut images: Vec<Vec<f32>> = (0..4).map(|_| render(&t, &mut rng).unwrap()).collect();
        images.push(vec![1.0; IMAGE_LEN]);
        let dir = std::env::temp_dir().join(format!("flowrun-world-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("grid.png");
        write_png_grid(&path, &images, 3, 2).unwrap();

        let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let mut reader = ::png::Decoder::new(file).read_info().unwrap();
        let mut out = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut out).unwrap();
        assert_eq!(info.color_type, ::png::ColorType::Rgb);
        let (w, h) = (info.width as usize, info.height as usize);
        assert_eq!((w, h), (3 * 64 + 4 * GUTTER, 2 * 64 + 3 * GUTTER));
        let px = |x: usize, y: usize| &out[(y * w + x) * 3..(y * w + x) * 3 + 3];
        assert_eq!(px(0, 0), GUTTER_RGB);
        // Top-left pixel of the first image is background (0.0 → 128).
        assert_eq!(px(GUTTER, GUTTER), [128, 128, 128]);
        // The fifth image (all 1.0) is white: row 1, column 1.
        let (x5, y5) = (GUTTER + 64 + GUTTER + 10, GUTTER + 64 + GUTTER + 10);
        assert_eq!(px(x5, y5), [255, 255, 255]);
        // Matches image_to_rgb8 with 2x nearest-neighbour upscaling.
        let rgb = image_to_rgb8(&images[1]).unwrap();
        let (ox, oy) = (GUTTER + 64 + GUTTER, GUTTER);
        for y in 0..64 {
            for x in 0..64 {
                let s = ((y / 2) * 32 + x / 2) * 3;
                assert_eq!(px(ox + x, oy + y), &rgb[s..s + 3]);
            }
        }
        // No temp files left behind.
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_round_trip_arbitrary_rgb_images() {
        let (w, h) = (7, 3);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 256) as u8).collect();
        let bytes = encode_rgb8(w, h, &rgb).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(decode_rgb8(&bytes).unwrap(), (w, h, rgb));
        assert!(encode_rgb8(2, 2, &[0; 11]).is_err());
        assert!(encode_rgb8(0, 2, &[]).is_err());
        assert!(decode_rgb8(b"not a png").is_err());
    }

    #[test]
    fn should_reject_bad_grid_input() {
        let p = std::env::temp_dir().join("flowrun-never-written.png");
        assert!(write_png_grid(&p, &[], 1, 1).is_err());
        assert!(write_png_grid(&p, &[vec![0.0; 10]], 1, 1).is_err());
        assert!(write_png_grid(&p, &[vec![0.0; IMAGE_LEN]], 0, 1).is_err());
        assert!(write_png_grid(&p, &[vec![0.0; IMAGE_LEN]], 1, 0).is_err());
        assert!(!p.exists());
        assert_eq!(image_to_rgb8(&[f32::NAN; IMAGE_LEN]).unwrap()[0], 0);
        assert!(image_to_rgb8(&[0.0; 5]).is_err());
        // Any size: HWC order, one pixel after another.
        let img = [-1.0, 1.0, 0.0, -1.0, 1.0, 1.0];
        assert_eq!(chw_to_rgb8(&img, 1, 2).unwrap(), [0, 128, 255, 255, 0, 255]);
        assert!(chw_to_rgb8(&img, 2, 2).is_err());
    }
}
