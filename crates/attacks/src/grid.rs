//! A PNG of originals above their reconstructions, for the eye.

use std::path::Path;

/// Writes `rows` of images (each `channels x height x width`, values clipped to [0, 1]) as one
/// PNG: row after row, one pixel of gap, grey for one channel and RGB for three.
pub fn write_png(
    path: &Path,
    rows: &[Vec<Vec<f32>>],
    channels: usize,
    height: usize,
    width: usize,
) -> Result<(), String> {
    if channels != 1 && channels != 3 {
        return Err(format!("{}: images of {channels} channels cannot be drawn (1 or 3)", path.display()));
    }
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let (grid_w, grid_h) = (columns * (width + 1) + 1, rows.len().max(1) * (height + 1) + 1);
    let mut pixels = vec![255u8; grid_w * grid_h * channels];
    for (r, row) in rows.iter().enumerate() {
        for (col, image) in row.iter().enumerate() {
            if image.len() != channels * height * width {
                return Err(format!(
                    "{}: an image of {} values, expected {channels} x {height} x {width}",
                    path.display(),
                    image.len()
                ));
            }
            for c in 0..channels {
                for i in 0..height {
                    for j in 0..width {
                        let v = image[(c * height + i) * width + j];
                        let byte = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                        let (y, x) = (r * (height + 1) + 1 + i, col * (width + 1) + 1 + j);
                        pixels[(y * grid_w + x) * channels + c] = byte;
                    }
                }
            }
        }
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), grid_w as u32, grid_h as u32);
    encoder.set_color(if channels == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb });
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| format!("{}: {e}", path.display()))?;
    writer.write_image_data(&pixels).map_err(|e| format!("{}: {e}", path.display()))?;
    writer.finish().map_err(|e| format!("{}: {e}", path.display()))
}
