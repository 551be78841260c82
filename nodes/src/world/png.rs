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
    let plane = IMAGE_SIZE * IMAGE_SIZE;
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
    let mut bytes = Vec::new();
    {
        let mut enc = ::png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(::png::ColorType::Rgb);
        enc.set_depth(::png::BitDepth::Eight);
        let fmt = |e: ::png::EncodingError| WorldError::Format(format!("png: {e}"));
        let mut writer = enc.write_header().map_err(fmt)?;
        writer.write_image_data(&buf).map_err(fmt)?;
        writer.finish().map_err(fmt)?;
    }
    write_atomic(path.as_ref(), &bytes)
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
    fn should_reject_bad_grid_input() {
        let p = std::env::temp_dir().join("flowrun-never-written.png");
        assert!(write_png_grid(&p, &[], 1, 1).is_err());
        assert!(write_png_grid(&p, &[vec![0.0; 10]], 1, 1).is_err());
        assert!(write_png_grid(&p, &[vec![0.0; IMAGE_LEN]], 0, 1).is_err());
        assert!(write_png_grid(&p, &[vec![0.0; IMAGE_LEN]], 1, 0).is_err());
        assert!(!p.exists());
        assert_eq!(image_to_rgb8(&[f32::NAN; IMAGE_LEN]).unwrap()[0], 0);
        assert!(image_to_rgb8(&[0.0; 5]).is_err());
    }
}
